"""Training throughput of kibitz's own loop (train.py) on one device, over a grid of settings.

    python bench/throughput.py                       # on a GPU machine: the full grid, writes throughput.json
    python bench/throughput.py --smoke               # CPU-sized grid in seconds (what CI runs)

For the chess evaluator: batch sizes 1k-64k x precision (32-true, bf16-mixed, bf16-true) x torch.compile
off/on x the dataset memory-mapped (a DataLoader gathers each batch on the host) or on the device
(`--data.on-device`: one gather there). For the dVAE: tokens/s at the default size, per precision and
compile. Each cell is a real `train.train` run whose log rows give samples/s, MFU (per device, against the
peak monitor.device_peak finds for the compute dtype) and the share of step time spent waiting for data;
the first log interval (compilation, warm-up) is dropped and the median of the rest is reported.

The data: the bundled sample's training split tiled `--tile` times into a scratch directory (the same
101-byte rows repeated: enough steps per epoch for large batches; the content does not matter for speed).
Validation and test, which are not measured, keep only their first `--eval-rows` positions.
"""

import argparse
import contextlib
import csv
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's flat modules

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train  # noqa: E402
from chessdata.folder import SPLITS  # noqa: E402
from chessdata.prepare import ensure_prepared  # noqa: E402
from config import FabricConfig, LogConfig, MonitorConfig, TrainConfig  # noqa: E402
from tasks import TASKS  # noqa: E402
from tasks.chess import ChessConfig, ChessData, ChessLog, PositionsData  # noqa: E402
from tasks.dvae import DVAEConfig  # noqa: E402

SAMPLE_DIR, SAMPLE = Path("data/cache/sample"), [Path("data/sample.pgn.zst")]


def tiled_dataset(out: Path, tile: int, eval_rows: int) -> Path:
    """The sample's prepared splits with the training split repeated `tile` times, and val and test cut
    to `eval_rows` positions (each cell ends with a validation and a test, which are not measured)."""
    ensure_prepared(SAMPLE, SAMPLE_DIR)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        for name in ("positions", "cp", "mate"):
            array = np.load(SAMPLE_DIR / split / f"{name}.npy", mmap_mode="r")
            array = np.concatenate([array] * tile) if split == "train" else array[:eval_rows]
            np.save(out / split / f"{name}.npy", array)
    shutil.copy(SAMPLE_DIR / "meta.json", out / "meta.json")  # same sources: ensure_prepared accepts it
    return out


def measure(cfg, steps: int, log_every: int) -> dict:
    """Run train.train for `steps` steps; medians of the log rows after the first interval."""
    with contextlib.redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        train.train(cfg, TASKS[cfg.task])
        wall = time.perf_counter() - started
    run_dir = max(cfg.out_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    rows: dict[str, dict[int, float]] = {}
    with open(run_dir / "metrics.csv") as f:
        for r in csv.DictReader(f):
            rows.setdefault(r["name"], {})[int(r["step"])] = float(r["value"])
    result = {"wall_s": wall}
    for name in ("perf/samples_per_s", "perf/tokens_per_s", "perf/mfu", "perf/data_wait_pct", "perf/peak_mem_gb"):
        values = [v for step, v in sorted(rows.get(name, {}).items()) if step > log_every]
        if values:
            result[name.removeprefix("perf/")] = statistics.median(values)
    return result


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU sizes: a few steps of small batches")
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed", "bf16-true"])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per cell")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--tile", type=int, default=50, help="training split repeats (50 x 210k = 10.5M rows)")
    parser.add_argument("--eval-rows", type=int, default=16384, help="positions kept in val and test")
    parser.add_argument("--out", type=Path, default=Path("throughput.json"))
    return parser.parse_args()


def main() -> None:
    args = arguments()
    if args.smoke:
        args.batches, args.precisions, args.steps, args.log_every, args.tile = [256], ["32-true"], 12, 4, 1
        args.eval_rows = 1024
    compiles = [False, True] if torch.cuda.is_available() and not args.smoke else [False]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"kibitz training throughput on {device}, torch {torch.__version__}")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = tiled_dataset(Path(tmp) / "data", args.tile, args.eval_rows)
        common = dict(monitor=MonitorConfig(histogram_every=None), out_dir=Path(tmp) / "runs")
        log = dict(logger="csv", progress_bar=False, every=args.log_every)
        train_config = TrainConfig(max_steps=args.steps, val_every=10**9)
        cells = [
            ("chess", batch, precision, compiled, on_device)
            for batch in args.batches
            for precision in args.precisions
            for compiled in compiles
            for on_device in (False, True)
        ]
        cells += [
            ("dvae", 512 if not args.smoke else 64, precision, compiled, True)
            for precision in args.precisions
            for compiled in compiles
        ]
        print(
            f"\n{'task':<7}{'batch':>7}{'precision':>12}{'compile':>9}{'data':>8}"
            f"{'samples/s':>14}{'tokens/s':>14}{'MFU':>8}{'data wait':>11}"
        )
        for task, batch, precision, compiled, on_device in cells:
            batching = dict(dir=directory, batch_size=batch, eval_batch_size=8192, on_device=on_device)
            if task == "chess":
                cfg = ChessConfig(**common, data=ChessData(**batching), log=ChessLog(**log, predictions=0))
            else:
                cfg = DVAEConfig(**common, data=PositionsData(**batching), log=LogConfig(**log))
            cfg.fabric = FabricConfig(precision=precision, devices="1")
            cfg.train = TrainConfig(**{**train_config.__dict__, "compile": compiled})
            cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, args.steps)
            try:
                row = measure(cfg, args.steps, args.log_every)
            except Exception as exc:  # e.g. bf16 on a CPU without it, or out of memory: record and go on
                row = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
            row.update(
                task=task, batch=batch, precision=precision, compile=compiled, data="device" if on_device else "memmap"
            )
            results.append(row)
            mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
            print(
                f"{task:<7}{batch:>7}{precision:>12}{str(compiled):>9}{row['data']:>8}"
                f"{row.get('samples_per_s', float('nan')):>14,.0f}{row.get('tokens_per_s', float('nan')):>14,.0f}"
                f"{mfu:>8}{row.get('data_wait_pct', float('nan')):>10.1f}%"
                + (f"  {row['error']}" if "error" in row else "")
            )
    best = max(
        (r for r in results if r["task"] == "chess" and "samples_per_s" in r),
        key=lambda r: r["samples_per_s"],
        default=None,
    )
    if best:
        ratio = best["samples_per_s"] / 7300
        ratio = f"{ratio:.2f}" if ratio < 10 else f"{ratio:,.0f}"
        print(
            f"\nbest chess cell: {best['samples_per_s']:,.0f} samples/s ({best['batch']}, {best['precision']}, "
            f"compile {best['compile']}, data {best['data']}) = {ratio}x the reference "
            f"project's 7.3k samples/s; an epoch of 37M positions in {37e6 / best['samples_per_s']:.1f} s"
        )
    args.out.write_text(
        json.dumps(
            {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": results},
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
