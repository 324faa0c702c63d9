"""Games between two UCI engines, and the Elo difference they measure.

    python -m tasks.arena --games 200 --depth 1 --concurrency 2 \\
        --engine "python -m tasks.engine --ckpt runs/x/checkpoints/last.ckpt" \\
        --opponent "python -m tasks.engine --material" --pgn games.pgn

Each game starts from an opening: the first moves of one of the bundled sample's games, every opening played twice,
once with each colour, so neither side gets the better openings. A game ends by the rules (claimed draws included)
or, past `--max-plies`, as a draw. As in engine tournaments, a lost position is resigned: a game ends when both
engines have scored it beyond `--resign-cp` for the same side on each of their last `--resign-moves` moves (an engine
that cannot mate at a shallow depth would otherwise play on to the move limit). Printed: wins, draws and losses of
the engine, its score, and the Elo difference with its 95 % interval; every game goes into the PGN file.
"""

import io
import math
import queue
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
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
    opponent_depth: int | None = None
    """The opponent's own depth, with --opponent-movetime (unset both: the same limit as the engine's)."""
    opponent_movetime: float | None = None
    """The opponent's own seconds a move (Stockfish's strength limits need time to think in)."""
    opening_plies: int = 8
    """How many moves of a sample game make an opening."""
    max_plies: int = 300
    """A game still going after this many plies is a draw."""
    resign_cp: int = 1000
    """A game is resigned when both engines score it beyond this many centipawns for the same side..."""
    resign_moves: int = 5
    """... on each of their last this many moves (0: never)."""
    concurrency: int = 1
    """Games played at once, each by its own pair of engine processes."""
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


def play(white: tuple, black: tuple, opening: list[chess.Move], args: ArenaArgs) -> chess.pgn.Game:
    """One game from the opening between White's and Black's (engine, limit); its result "1-0", "0-1" or
    "1/2-1/2"."""
    board, scores, resigned, this_game = chess.Board(), [], None, object()
    for move in opening:
        board.push(move)
    while not board.is_game_over(claim_draw=True) and board.ply() < args.max_plies and resigned is None:
        mover, limit = white if board.turn == chess.WHITE else black
        played = mover.play(board, limit, info=chess.engine.INFO_SCORE, game=this_game)  # a new game: ucinewgame
        score = played.info.get("score")
        scores.append(None if score is None else score.white().score(mate_score=100_000))
        board.push(played.move)  # python-chess refuses an illegal move
        resigned = resignation(scores, args.resign_cp, args.resign_moves)
    game = chess.pgn.Game.from_board(board)
    outcome = board.outcome(claim_draw=True)
    game.headers["Result"] = resigned or (outcome.result() if outcome else "1/2-1/2")
    if resigned:
        game.headers["Termination"] = "adjudication"
    game.headers["White"], game.headers["Black"] = white[0].id.get("name", "?"), black[0].id.get("name", "?")
    return game


def resignation(scores: list[int | None], centipawns: int, moves: int) -> str | None:
    """The result once both engines' last `moves` scores (from White's view) are beyond `centipawns` for one side."""
    last = scores[-2 * moves :]
    if moves <= 0 or len(last) < 2 * moves or None in last:
        return None
    if all(score >= centipawns for score in last):
        return "1-0"
    if all(score <= -centipawns for score in last):
        return "0-1"
    return None


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
    # an engine on a network imports torch and loads its checkpoint before it answers: more than python-chess's 10 s
    # on a busy machine
    engine = chess.engine.SimpleEngine.popen_uci(shlex.split(command), timeout=120)
    try:
        engine.configure(dict(option.split("=", 1) for option in options))
    except BaseException:
        engine.quit()
        raise
    return engine


def play_all(args: ArenaArgs) -> list[tuple[chess.pgn.Game, bool]]:
    """Every opening with each colour, `--concurrency` games at once; each game with whether the measured engine
    had White, in the openings' order."""
    mine = chess.engine.Limit(depth=args.depth, time=args.movetime)
    theirs = chess.engine.Limit(depth=args.opponent_depth, time=args.opponent_movetime)
    if args.opponent_depth is None and args.opponent_movetime is None:
        theirs = mine
    games = [(opening, white) for opening in openings((args.games + 1) // 2, args.opening_plies) for white in (1, 0)]
    engines, free = [], queue.SimpleQueue()

    def one(game: tuple[list[chess.Move], bool]) -> tuple[chess.pgn.Game, bool]:
        (opening, measured_white), (measured, opponent) = game, free.get()
        white, black = (measured, mine), (opponent, theirs)
        if not measured_white:
            white, black = black, white
        try:
            return play(white, black, opening, args), bool(measured_white)
        finally:
            free.put((measured, opponent))

    try:
        for _ in range(args.concurrency):  # started here: python-chess's engines start from the main thread alone
            engines.append(started(args.engine, []))
            engines.append(started(args.opponent, args.opponent_option))
            free.put((engines[-2], engines[-1]))
        with ThreadPoolExecutor(args.concurrency) as pool:
            played = []
            for game, measured_white in pool.map(one, games):
                played.append((game, measured_white))
                colour = "white" if measured_white else "black"
                print(f"game {len(played)}: {game.headers['Result']} ({colour})", flush=True)
            return played
    finally:
        for engine in engines:
            engine.quit()


def mistake_in(args: ArenaArgs) -> str | None:
    """What is wrong with the arena's flags, in words; None when nothing is."""
    for name in ("games", "concurrency", "opening_plies", "max_plies"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')}: expected at least 1, got {getattr(args, name)}"
    bad = [option for option in args.opponent_option if "=" not in option]
    if bad:
        return f"--opponent-option: expected NAME=VALUE, got {bad[0]!r}"
    if args.pgn is not None and (args.pgn.is_dir() or not args.pgn.parent.is_dir()):  # known before the games
        return f"--pgn: expected a file in an existing folder, got {args.pgn}"
    return None


def main(argv: list[str]) -> int:
    args = tyro.cli(ArenaArgs, args=argv, prog="python -m tasks.arena")
    if mistake := mistake_in(args):
        print(f"error: {mistake}", file=sys.stderr)
        return 2
    try:
        played = play_all(args)
    except (OSError, chess.engine.EngineError, chess.engine.EngineTerminatedError) as exc:
        print(f"error: an engine failed: {exc or type(exc).__name__}", file=sys.stderr)
        return 2
    points = []
    for game, measured_white in played:
        result = game.headers["Result"]
        points.append(0.5 if result == "1/2-1/2" else float((result == "1-0") == measured_white))
    if args.pgn:
        args.pgn.write_text("\n\n".join(str(game) for game, _ in played) + "\n")
    score, difference, interval = elo(points)
    wins, draws = points.count(1.0), points.count(0.5)
    print(f"{args.engine} against {args.opponent}: {len(points)} games")
    print(f"  wins {wins}, draws {draws}, losses {len(points) - wins - draws}; score {score:.3f}")
    print(f"  Elo difference {round(difference) or 0:+d} +- {interval:.0f} (95 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
