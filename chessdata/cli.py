"""`python -m chessdata prepare | dump | make-sample` (see the package docstring)."""

import sys
from pathlib import Path
from typing import Annotated

import tyro

from chessdata.encoding import row_to_fen
from chessdata.evals import format_eval
from chessdata.folder import SAMPLE_PGN, load_split


def prepare(
    sources: Annotated[list[Path], tyro.conf.Positional],
    out: Path,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_games: int | None = None,
    workers: int = 0,
    games_per_chunk: int = 20_000,
    min_ply: int = 0,
    min_elo: int | None = None,
    max_elo: int | None = None,
    time_controls: list[str] | None = None,
    dedup: bool = True,
    dedup_memory_gb: float = 2.0,
) -> dict:
    """Read lichess `.pgn` / `.pgn.zst` files and write packed positions with their evals.

    Args:
        sources: PGN files (`.pgn` or `.pgn.zst`) in lichess export form, with `%eval` comments.
        out: Output directory.
        val_fraction: Share of games that go to the validation split.
        test_fraction: Share of games that go to the test split.
        max_games: Stop after this many games have been read (all games when unset).
        workers: Parallel parsing processes (0 = all cores). The output does not depend on it.
        games_per_chunk: Games read per unit of work (and per restartable shard).
        min_ply: Skip games with fewer evaluated positions than this.
        min_elo: Keep games whose two players are both rated at least this.
        max_elo: Keep games whose two players are both rated at most this.
        time_controls: Keep only these TimeControl header values (e.g. 180+2 600+0).
        dedup: Merge identical positions within a split (mean eval, count.npy) and remove positions of
            test from val and train, and of val from train.
        dedup_memory_gb: About the most memory deduplication takes (the data is done in buckets of this size).
    """
    from chessdata import prepare as preparation

    filters = preparation.Filters(
        val_fraction,
        test_fraction,
        min_ply,
        min_elo,
        max_elo,
        tuple(time_controls) if time_controls is not None else None,
        dedup,
    )
    return preparation.prepare(sources, out, filters, max_games, workers, games_per_chunk, dedup_memory_gb * 1e9)


def dump(directory: Annotated[Path, tyro.conf.Positional], split: str = "test", limit: int | None = 10) -> None:
    """Print stored positions as `FEN<TAB>EVAL`, the FEN rebuilt from the stored bits.

    Args:
        directory: A directory written by `prepare`.
        split: train, val or test.
        limit: Number of positions to print (all when unset).
    """
    if limit is not None and limit < 0:
        raise SystemExit(f"error: --limit: expected a count >= 0 (unset: all), got {limit}")
    arrays = load_split(directory, split)
    count = len(arrays["cp"]) if limit is None else min(limit, len(arrays["cp"]))
    for i in range(count):
        print(f"{row_to_fen(arrays['positions'][i])}\t{format_eval(int(arrays['cp'][i]), int(arrays['mate'][i]))}")


def make_sample(
    out: Path = SAMPLE_PGN,
    games: int = 3000,
    depth: int = 8,
    workers: int = 2,
    seed: int = 0,
    random_rate: float = 0.08,
    engine: str | None = None,
) -> None:
    """Generate the bundled sample: Stockfish self-play in lichess PGN form, zstd-compressed.

    Args:
        out: Output `.pgn.zst` file.
        games: Number of games.
        depth: Stockfish search depth for every eval.
        workers: Parallel engines (one process each).
        seed: Base seed; game i uses its own seed derived from it.
        random_rate: Chance that a move after the opening is random instead of the engine's choice.
        engine: Path to the stockfish binary (searched on PATH and /usr/games when unset).
    """
    from chessdata import sample  # needs an engine; imported only here

    sample.make_sample(out, games, depth, workers, seed, random_rate, engine)


def main(argv: list[str] | None = None) -> None:
    try:
        tyro.extras.subcommand_cli_from_dict(
            {"prepare": prepare, "dump": dump, "make-sample": make_sample}, prog="python -m chessdata", args=argv
        )
    except BrokenPipeError:  # `dump | head`
        sys.stderr.close()
    except SystemExit as exc:  # every one-line error exits 2, as the trainer's do
        if not isinstance(exc.code, str):
            raise
        sys.stderr.write(exc.code + "\n")
        raise SystemExit(2) from None
