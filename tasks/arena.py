"""Games between two UCI engines, and the Elo difference they measure.

    python -m tasks.arena --games 200 --depth 2 \\
        --engine "python -m tasks.engine --ckpt runs/x/checkpoints/last.ckpt" \\
        --opponent "python -m tasks.engine --material" --pgn games.pgn

Each game starts from an opening: the first moves of one of the bundled sample's games, every opening played twice,
once with each colour, so neither side gets the better openings. A game ends by the rules (claimed draws included)
or, past `--max-plies`, as a draw. Printed: wins, draws and losses of the engine, its score, and the Elo difference
with its 95 % interval; every game goes into the PGN file.
"""

import io
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as a path: this folder would come first on the import path, its chess.py before python-chess
    sys.stderr.write("error: run it as a module, from the repository's root: python -m tasks.arena ...\n")
    sys.exit(2)

import chess
import chess.engine
import chess.pgn
import tyro

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample.pgn.zst"


@dataclass
class ArenaArgs:
    engine: str = "python -m tasks.engine --material"
    """The engine measured: its command line."""
    opponent: str = "python -m tasks.engine --material"
    """The engine it plays: its command line (Stockfish: /usr/games/stockfish)."""
    opponent_option: list[str] = field(default_factory=list)
    """UCI options of the opponent, NAME=VALUE (Stockfish at its weakest: UCI_LimitStrength=true UCI_Elo=1350)."""
    games: int = 20
    """Games to play (rounded up to an even number: each opening is played with both colours)."""
    depth: int | None = 2
    """Search depth of each move, for both engines (unset: --movetime alone)."""
    movetime: float | None = None
    """Seconds a move, for both engines."""
    opening_plies: int = 8
    """How many moves of a sample game make an opening."""
    max_plies: int = 300
    """A game still going after this many plies is a draw."""
    pgn: Path | None = None
    """Where to write the games."""


def openings(count: int, plies: int, source: Path = SAMPLE) -> list[list[chess.Move]]:
    """The first `plies` moves of the first `count` different openings among the sample's games."""
    import zstandard

    found, seen = [], set()
    with open(source, "rb") as raw:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        while len(found) < count and (game := chess.pgn.read_game(text)) is not None:
            moves = list(game.mainline_moves())[:plies]
            key = tuple(move.uci() for move in moves)
            if len(moves) == plies and key not in seen:
                seen.add(key)
                found.append(moves)
    return found


def play(white, black, opening: list[chess.Move], limit: chess.engine.Limit, max_plies: int) -> chess.pgn.Game:
    """One game from the opening; its result "1-0", "0-1" or "1/2-1/2"."""
    board = chess.Board()
    for move in opening:
        board.push(move)
    while not board.is_game_over(claim_draw=True) and board.ply() < max_plies:
        mover = white if board.turn == chess.WHITE else black
        board.push(mover.play(board, limit).move)  # python-chess refuses an illegal move
    game = chess.pgn.Game.from_board(board)
    outcome = board.outcome(claim_draw=True)
    game.headers["Result"] = outcome.result() if outcome else "1/2-1/2"
    game.headers["White"], game.headers["Black"] = white.id.get("name", "?"), black.id.get("name", "?")
    return game


def elo(points: list[float]) -> tuple[float, float, float]:
    """The score, the Elo difference it implies, and the half-width of its 95 % interval (from the per-game
    variance of the results)."""
    n = len(points)
    score = sum(points) / n
    deviation = math.sqrt(sum((p - score) ** 2 for p in points) / n / n)

    def difference(s: float) -> float:
        s = min(max(s, 1e-3), 1 - 1e-3)
        return -400 * math.log10(1 / s - 1)

    low, high = difference(score - 1.96 * deviation), difference(score + 1.96 * deviation)
    return score, difference(score), (high - low) / 2


def started(command: str, options: list[str]):
    engine = chess.engine.SimpleEngine.popen_uci(shlex.split(command))
    settings = dict(option.split("=", 1) for option in options)
    if settings:
        engine.configure(settings)
    return engine


def main(argv: list[str]) -> int:
    args = tyro.cli(ArenaArgs, args=argv, prog="python -m tasks.arena")
    limit = chess.engine.Limit(depth=args.depth, time=args.movetime)
    measured, opponent = started(args.engine, []), started(args.opponent, args.opponent_option)
    points, results, games = [], {"win": 0, "draw": 0, "loss": 0}, []
    try:
        for opening in openings((args.games + 1) // 2, args.opening_plies):
            for measured_white in (True, False):
                white, black = (measured, opponent) if measured_white else (opponent, measured)
                game = play(white, black, opening, limit, args.max_plies)
                result = game.headers["Result"]
                point = 0.5 if result == "1/2-1/2" else float((result == "1-0") == measured_white)
                points.append(point)
                results[{1.0: "win", 0.5: "draw", 0.0: "loss"}[point]] += 1
                games.append(game)
                print(f"game {len(games)}: {result} ({'white' if measured_white else 'black'})", flush=True)
    finally:
        measured.quit()
        opponent.quit()
    if args.pgn:
        args.pgn.write_text("\n\n".join(str(game) for game in games) + "\n")
    score, difference, interval = elo(points)
    print(f"{args.engine} against {args.opponent}: {len(points)} games")
    print(f"  wins {results['win']}, draws {results['draw']}, losses {results['loss']}; score {score:.3f}")
    print(f"  Elo difference {round(difference) or 0:+d} +- {interval:.0f} (95 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
