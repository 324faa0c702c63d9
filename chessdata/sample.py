"""The bundled sample: Stockfish self-play games written in exact lichess PGN form.

Every move carries `{ [%eval X] [%clk H:MM:SS] }` like a lichess export of an analysed game, with X
Stockfish's eval of the position after the move at a fixed depth (pawns, White's view; `#N` mates).
Openings are varied by a few random plies, and later moves are sometimes random too, so positions
range from balanced to lost. Games are played in parallel, one engine per worker; each game's
randomness comes from its own seed, so the output does not depend on the worker count.

Run through `python -m chessdata make-sample`; needs the `stockfish` binary (Debian: /usr/games/stockfish).
"""

import datetime
import io
import multiprocessing
import random
import shutil
from pathlib import Path

import chess
import chess.engine
import zstandard

from chessdata.evals import format_eval

ENGINE_PATHS = ("stockfish", "/usr/games/stockfish", "/usr/local/bin/stockfish")
START_CLOCK_S, INCREMENT_S = 180, 2
RESIGN_PAWNS, RESIGN_PLIES, MAX_PLIES = 8.0, 4, 200


def find_engine(path: str | None = None) -> str:
    for candidate in [path] if path else ENGINE_PATHS:
        found = shutil.which(candidate)
        if found:
            return found
    raise SystemExit(
        f"error: stockfish not found (tried {', '.join([path] if path else ENGINE_PATHS)}); "
        "install it (Debian: apt-get install stockfish) or pass --engine PATH"
    )


def score_text(score: chess.engine.PovScore) -> tuple[str, float]:
    """Eval in lichess notation and as pawns (mates as +-100), both from White's view."""
    white = score.white()
    if white.is_mate():
        mate = white.mate()
        return format_eval(0, mate), 100.0 if mate > 0 else -100.0
    cp = white.score()
    return format_eval(cp, 0), cp / 100


def clock_text(seconds: int) -> str:
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def play_game(engine: chess.engine.SimpleEngine, seed: int, depth: int, random_rate: float) -> str:
    """One game as lichess PGN text."""
    rng = random.Random(seed)
    board = chess.Board()
    opening_plies = rng.randint(2, 8)
    clocks = [START_CLOCK_S, START_CLOCK_S]
    moves: list[str] = []
    # game=seed: python-chess sends `ucinewgame` for each new game, which clears Stockfish's hash,
    # so a game's moves do not depend on the games the same engine played before.
    info = engine.analyse(board, chess.engine.Limit(depth=depth), game=seed)
    lost_streak, result, termination = 0, None, "Normal"
    while result is None:
        legal = list(board.legal_moves)
        best = info.get("pv", [None])[0]
        if board.ply() < opening_plies or best is None or rng.random() < random_rate:
            move = rng.choice(legal)
        else:
            move = best
        side = 0 if board.turn == chess.WHITE else 1
        clocks[side] = max(1, clocks[side] - rng.randint(1, 9) + INCREMENT_S)
        number = f"{board.fullmove_number}. " if board.turn == chess.WHITE else f"{board.fullmove_number}... "
        san = board.san(move)
        board.push(move)
        comment = f"[%clk {clock_text(clocks[side])}]"
        if not board.is_checkmate():  # lichess puts no eval after a mating move
            info = engine.analyse(board, chess.engine.Limit(depth=depth), game=seed)
            text, pawns = score_text(info["score"])
            comment = f"[%eval {text}] {comment}"
            lost_streak = lost_streak + 1 if abs(pawns) >= RESIGN_PAWNS else 0
        moves.append(f"{number}{san} {{ {comment} }}")
        outcome = board.outcome(claim_draw=True)
        if outcome is not None:
            result = outcome.result()
        elif lost_streak >= RESIGN_PLIES:  # the losing side resigns
            result = "1-0" if pawns > 0 else "0-1"
        elif board.ply() >= MAX_PLIES:
            result, termination = "1/2-1/2", "Time forfeit"
    return headers(seed, rng, result, termination) + " ".join(moves) + f" {result}\n\n"


def headers(seed: int, rng: random.Random, result: str, termination: str) -> str:
    when = datetime.datetime(2024, 1, 1) + datetime.timedelta(minutes=seed * 7)
    white_elo, black_elo = rng.randint(1500, 2600), rng.randint(1500, 2600)
    site = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(8))
    tags = [
        ("Event", "Rated Blitz game"),
        ("Site", f"https://lichess.org/{site}"),
        ("Date", when.strftime("%Y.%m.%d")),
        ("Round", "-"),
        ("White", f"sf-sample-{rng.randint(1, 99)}"),
        ("Black", f"sf-sample-{rng.randint(1, 99)}"),
        ("Result", result),
        ("UTCDate", when.strftime("%Y.%m.%d")),
        ("UTCTime", when.strftime("%H:%M:%S")),
        ("WhiteElo", str(white_elo)),
        ("BlackElo", str(black_elo)),
        ("WhiteRatingDiff", f"{rng.randint(-8, 8):+d}"),
        ("BlackRatingDiff", f"{rng.randint(-8, 8):+d}"),
        ("ECO", "?"),
        ("Opening", "?"),
        ("TimeControl", f"{START_CLOCK_S}+{INCREMENT_S}"),
        ("Termination", termination),
    ]
    return "".join(f'[{key} "{value}"]\n' for key, value in tags) + "\n"


_engine: chess.engine.SimpleEngine | None = None


def _worker_init(engine_path: str) -> None:
    global _engine
    _engine = chess.engine.SimpleEngine.popen_uci(engine_path)
    _engine.configure({"Threads": 1, "Hash": 16})


def _worker_play(args: tuple[int, int, float]) -> str:
    return play_game(_engine, *args)


def make_sample(
    out: Path, games: int, depth: int, workers: int, seed: int, random_rate: float, engine: str | None = None
) -> None:
    engine_path = find_engine(engine)
    out.parent.mkdir(parents=True, exist_ok=True)
    tasks = [(seed * 1_000_003 + i, depth, random_rate) for i in range(games)]
    buffer = io.StringIO()
    with multiprocessing.Pool(workers, initializer=_worker_init, initargs=(engine_path,)) as pool:
        for i, game in enumerate(pool.imap(_worker_play, tasks, chunksize=4)):  # imap keeps game order
            buffer.write(game)
            if (i + 1) % 100 == 0:
                print(f"{i + 1}/{games} games", flush=True)
    data = zstandard.ZstdCompressor(level=19).compress(buffer.getvalue().encode())
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    print(f"wrote {out}: {games} games, {len(data) / 1e6:.1f} MB")
