"""Chess data throughput, every arm measured in this run on the same file; prints ratios.

    python bench/data.py                          # corpora built from the bundled sample
    python bench/data.py --source month.pgn.zst   # a real lichess archive (use --max-games)

Arms: the naive python-chess loop (`read_game`, then `node.board()` for every evaluated move);
`prepare` on one worker; `prepare` on all cores; the loader delivering packed batches (and, for
reference, unpacking them on this CPU). Two corpora by default: the sample itself (every game
analysed) and a lichess-like mix in which 6 % of the games carry evals, as in a monthly archive.
"""

import argparse
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's flat modules

import chess.pgn  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402

import data  # noqa: E402
from chessdata import folder, pgn, prepare  # noqa: E402
from chessdata.encoding import unpack_bits  # noqa: E402

LICHESS_MONTH_TEXT_BYTES = 30e9 * 7  # ~30 GB compressed, PGN text ~7x larger
LICHESS_MONTH_POSITIONS = 375e6  # 350-400M evaluated positions a month


def build_mix(games: list[str], total: int, eval_share: float, path: Path) -> None:
    """`total` games, of which `eval_share` keep their evals; the rest have them stripped."""
    every = round(1 / eval_share)
    strip = re.compile(r"\[%eval [^\]]*\] ")
    mixed = [
        g if i % every == 0 else strip.sub("", g) for i, g in enumerate(games[i % len(games)] for i in range(total))
    ]
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress("".join(mixed).encode()))


def naive(path: Path, max_games: int) -> tuple[int, float]:
    """The reference hobby approach: read_game, then node.board() (a replay from the start) per eval."""
    start, positions = time.perf_counter(), 0
    with open(path, "rb") as raw:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        for _ in range(max_games):
            game = chess.pgn.read_game(text)
            if game is None:
                break
            for node in game.mainline():
                if node.eval() is not None:
                    node.board()
                    positions += 1
    return positions, time.perf_counter() - start


def timed_prepare(
    path: Path, out: Path, workers: int, games_per_chunk: int, max_games: int | None
) -> tuple[int, float]:
    start = time.perf_counter()
    meta = prepare.prepare([path], out, workers=workers, games_per_chunk=games_per_chunk, max_games=max_games)
    return sum(c["positions"] for c in meta["splits"].values()), time.perf_counter() - start


def cut_rate(path: Path) -> float:
    """MB/s of PGN text the main process decompresses, cuts into games and raw-filters."""
    start, size = time.perf_counter(), 0
    for game in pgn.iter_games(path):
        size += len(game)
        "%eval" in game  # noqa: B015 - the raw test prepare runs on every game
    return size / (time.perf_counter() - start)


PEAK_MEMORY = """
import resource, sys
from pathlib import Path
from chessdata import prepare
filters = prepare.Filters(dedup=sys.argv[3] == "dedup")
prepare.prepare([Path(sys.argv[1])], Path(sys.argv[2]), filters, None, 2, int(sys.argv[4]), float(sys.argv[5]))
# VmHWM, not ru_maxrss: that one keeps the high-water mark of the forked parent (this bench) across exec
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(status["VmHWM"].split()[0], resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_memory(path: Path, out: Path, dedup: bool, games_per_chunk: int, dedup_memory: float):
    """prepare in a fresh process (2 workers): positions, peak RSS of the main process and of the largest
    worker, in MB (Linux reports kB)."""
    import json
    import shutil
    import subprocess

    shutil.rmtree(out, ignore_errors=True)
    root = Path(__file__).resolve().parent.parent
    settings = ["dedup" if dedup else "plain", str(games_per_chunk), str(dedup_memory)]
    args = [sys.executable, "-c", PEAK_MEMORY, str(path), str(out), *settings]
    result = subprocess.run(args, cwd=root, capture_output=True, text=True, check=True)
    main_kb, worker_kb = map(int, result.stdout.split()[-2:])
    positions = sum(c["positions"] for c in json.loads((out / "meta.json").read_text())["splits"].values())
    return positions, main_kb / 1e3, worker_kb / 1e3


def loader_rate(directory: Path, batch_size: int, unpack: bool, seconds: float) -> float:
    arrays = folder.load_split(directory, "train")
    split = data.ArrayDataset(arrays["positions"], folder.eval_target(arrays["cp"], arrays["mate"], 15.0))
    loader = data.make_loader(split, batch_size=batch_size, shuffle=True, drop_last=True)
    delivered, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:  # whole epochs until the time has passed
        for packed, _ in loader:
            if unpack:
                unpack_bits(packed)
            delivered += len(packed)
    return delivered / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="a lichess .pgn.zst to measure instead of the built corpora")
    parser.add_argument("--mix-games", type=int, default=30_000, help="games in the lichess-like corpus")
    parser.add_argument("--naive-games", type=int, default=600, help="games the (slow) naive loop reads")
    parser.add_argument("--games-per-chunk", type=int, default=500)
    parser.add_argument("--max-games", type=int, help="games each prepare arm reads (default: all)")
    parser.add_argument("--loader-seconds", type=float, default=1.0, help="time per loader measurement")
    parser.add_argument("--memory-games", type=int, default=24_000, help="games of the larger peak-memory corpus")
    parser.add_argument("--dedup-memory-gb", type=float, default=0.1, help="prepare's dedup bound in the memory arm")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.source:
            corpora = {args.source.name: args.source}
        else:
            games = list(pgn.iter_games(folder.SAMPLE_PGN))
            corpora = {
                "sample (all games analysed)": folder.SAMPLE_PGN,
                "lichess-like mix (6 % analysed)": tmp / "mix.pgn.zst",
            }
            build_mix(games, args.mix_games, 0.06, corpora["lichess-like mix (6 % analysed)"])
        print(f"machine: {cores} cores; torch {torch.__version__}; date {time.strftime('%Y-%m-%d')}\n")
        one_worker = {}  # positions/s of prepare with 1 worker, per corpus
        for name, path in corpora.items():
            n_naive, t_naive = naive(path, args.naive_games)
            rows = [("naive python-chess loop", n_naive / t_naive)]
            n1, t1 = timed_prepare(path, tmp / "one", 1, args.games_per_chunk, args.max_games)
            rows.append(("prepare, 1 worker", n1 / t1))
            one_worker[path] = n1 / t1
            nn, tn = timed_prepare(path, tmp / "all", cores, args.games_per_chunk, args.max_games)
            rows.append((f"prepare, {cores} workers", nn / tn))
            print(f"{name}: {path.stat().st_size / 1e6:.1f} MB compressed, {n1} evaluated positions")
            print(f"  {'arm':<28}{'positions/s':>14}{'vs naive':>10}")
            for arm, rate in rows:
                print(f"  {arm:<28}{rate:>14,.0f}{rate / rows[0][1]:>9.1f}x")
            print(f"  prepare scaling 1 -> {cores} workers: {rows[2][1] / rows[1][1]:.2f}x\n")
        if not args.source:  # the same games twice over: memory must not grow with the output
            print(
                f"peak memory of prepare (2 workers, --games-per-chunk {args.games_per_chunk}, "
                f"--dedup-memory-gb {args.dedup_memory_gb}), in MB:"
            )
            print(f"  {'corpus':<34}{'positions':>11}{'main':>8}{'worker':>8}")
            for dedup in (False, True):
                for total in (args.memory_games // 4, args.memory_games):
                    corpus = tmp / f"memory-{total}.pgn.zst"
                    if not corpus.exists():
                        build_mix(games, total, 1.0, corpus)
                    n, main_mb, worker_mb = peak_memory(
                        corpus, tmp / "memory", dedup, args.games_per_chunk, args.dedup_memory_gb * 1e9
                    )
                    label = f"{total} analysed games{', dedup' if dedup else ''}"
                    print(f"  {label:<34}{n:>11,}{main_mb:>8.0f}{worker_mb:>8.0f}")
            print()
        mix = corpora.get("lichess-like mix (6 % analysed)", next(iter(corpora.values())))
        cut = cut_rate(mix)
        for batch in (4096, 65536):
            packed = loader_rate(tmp / "one", batch, unpack=False, seconds=args.loader_seconds)
            unpacked = loader_rate(tmp / "one", batch, unpack=True, seconds=args.loader_seconds)
            print(
                f"loader, batch {batch}: {packed / 1e6:.1f}M packed positions/s on one core "
                f"({unpacked / 1e6:.2f}M/s if also unpacked to float32 on this CPU)"
            )
        # the replay rate on analysed games alone (the sample's), else on the given source
        parse = one_worker.get(folder.SAMPLE_PGN, one_worker[mix])
        t_cut = LICHESS_MONTH_TEXT_BYTES / cut
        t_parse = LICHESS_MONTH_POSITIONS / (parse * 15)
        print(
            f"\nmain process cuts and raw-filters games at {cut / 1e6:.0f} MB/s of PGN text; "
            f"one worker replays {parse:,.0f} positions/s"
        )
        print(
            f"one lichess month on 16 cores (~{LICHESS_MONTH_TEXT_BYTES / 1e9:.0f} GB of text, "
            f"~{LICHESS_MONTH_POSITIONS / 1e6:.0f}M positions; cutting and 15 workers run side by side): "
            f"about {max(t_cut, t_parse) / 60:.0f} minutes "
            f"(cutting {t_cut / 60:.0f} min, replay {t_parse / 60:.0f} min)"
        )


if __name__ == "__main__":
    main()
