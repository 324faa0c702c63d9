"""Everything only a GPU can check, in one command on one GPU, in about 8 minutes at most:

    python bench/gpu_check.py            # on a GPU machine: prints two tables, writes gpu_check.json and .md
    python bench/gpu_check.py --smoke    # the same checks at CPU sizes in about a minute (what the suite runs)

1. Train and resume, bf16-mixed, under FSDP (whole-file checkpoints) and FSDP2 (a sharded checkpoint folder):
   a chess run of 400 steps, and the same run resumed (`--resume auto`) from its step-200 checkpoint in a fresh
   process; the resumed steps' losses and the final weights are compared with the uninterrupted run's (exact,
   or the largest difference). Killing runs at random moments is the CPU suite's job; this checks that the
   GPU's kernels, RNG states and sharded IO resume the same run.
2. The throughput grid's most telling cells (bench/throughput.py's `measure`, real `train.train` runs): chess at
   16k and 64k positions a batch in bf16-mixed, the data memory-mapped or on the device, eager and
   torch.compile, one 32-true (TF32) cell; the dVAE at 512 boards, eager and compiled. Samples/s, tokens/s,
   MFU (per device, Fabric's peak for the compute dtype) and the share of step time spent waiting for data.

Cells that would end past `--budget-s` are skipped (and say so), so the command ends in time on any GPU. The
markdown file is ready for the README; the JSON holds every number.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's flat modules
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from throughput import measure, tiled_dataset  # noqa: E402

from config import FabricConfig, LogConfig, MonitorConfig, TrainConfig  # noqa: E402
from tasks.chess import ChessConfig, ChessData, ChessLog, PositionsData  # noqa: E402
from tasks.dvae import DVAEConfig  # noqa: E402


def train_process(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError((result.stderr.strip().splitlines() or ["exit " + str(result.returncode)])[-1])
    return result


def losses(run_dir: Path) -> dict[int, float]:
    import csv

    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(last, run_dir / "whole.pt")
        last = run_dir / "whole.pt"
    return torch.load(last, map_location="cpu", weights_only=True)["model"]


def resume_check(name: str, flags: list[str], common: list[str], out: Path, steps: int, timeout: float) -> dict:
    """The run uninterrupted, then a copy of its folder cut back to its middle checkpoint and resumed."""
    half = steps // 2
    started = time.perf_counter()
    reference = out / f"{name}-reference"
    run = [*common, *flags, "--train.max-steps", str(steps), "--train.val-every", str(half // 2), "--out-dir"]
    train_process([*run, str(out), "--run-name", reference.name], timeout)
    resumed = out / f"{name}-resumed"
    shutil.copytree(reference, resumed)
    folder = resumed / "checkpoints"
    for path in folder.iterdir():  # what a run killed just after its step-`half` checkpoint would have left
        if path.name != f"step-{half:08d}.ckpt":
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    (folder / f"step-{half:08d}.ckpt").rename(folder / "last.ckpt")
    result = train_process([*run, str(out), "--run-name", resumed.name, "--resume", "auto"], timeout)
    expected, got = losses(reference), losses(resumed)
    after = [s for s in expected if s > half]
    loss_diff = max((abs(expected[s] - got.get(s, float("inf"))) for s in after), default=float("inf"))
    a, b = final_weights(reference), final_weights(resumed)
    weight_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    samples = [line for line in result.stdout.splitlines() if line.startswith("run folder:")]
    return {
        "check": name,
        "flags": " ".join(flags),
        "resumed_from": half,
        "steps": steps,
        "exact": loss_diff == 0 and weight_diff == 0,
        "max_loss_diff": loss_diff,
        "max_weight_diff": weight_diff,
        "seconds": time.perf_counter() - started,
        "layout": samples[-1].split("(", 1)[-1].rstrip(")") if samples else "",
    }


def throughput_cells(smoke: bool, compile_ok: bool) -> list[tuple]:
    """(task, batch, precision, compile, data on the device)."""
    if smoke:
        cells = [("chess", 256, "32-true", False, False), ("dvae", 64, "32-true", False, True)]  # bf16: resumes
        return cells + ([("chess", 256, "32-true", True, True)] if compile_ok else [])
    return [
        ("chess", 16384, "bf16-mixed", False, False),
        ("chess", 16384, "bf16-mixed", False, True),
        ("chess", 65536, "bf16-mixed", False, False),
        ("chess", 65536, "bf16-mixed", False, True),
        ("chess", 65536, "32-true", False, True),
        ("chess", 65536, "bf16-mixed", True, True),
        ("chess", 65536, "bf16-mixed", True, False),
        ("dvae", 512, "bf16-mixed", False, True),
        ("dvae", 512, "bf16-mixed", True, True),
    ]


def run_cell(cell: tuple, directory: Path, runs: Path, steps: int, log_every: int, accelerator: str) -> dict:
    task, batch, precision, compiled, on_device = cell
    common = dict(monitor=MonitorConfig(histogram_every=None), out_dir=runs)
    log = dict(logger="csv", progress_bar=False, every=log_every)
    batching = dict(dir=directory, batch_size=batch, eval_batch_size=8192, on_device=on_device)
    if task == "chess":
        cfg = ChessConfig(**common, data=ChessData(**batching), log=ChessLog(**log, predictions=0))
    else:
        cfg = DVAEConfig(**common, data=PositionsData(**batching), log=LogConfig(**log))
    cfg.fabric = FabricConfig(accelerator=accelerator, precision=precision, devices="1")
    cfg.train = TrainConfig(max_steps=steps, val_every=10**9, compile=compiled)
    cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, steps)
    if accelerator == "cpu":
        cfg.monitor.peak_tflops = 1.0  # no table knows a CPU: a stand-in, so the MFU column is exercised
    try:
        row = measure(cfg, steps, log_every)
    except Exception as exc:  # out of memory, a compiler missing: record and go on
        row = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
    return {"task": task, "batch": batch, "precision": precision, "compile": compiled, **row} | {
        "data": "device" if on_device else "memmap"
    }


def markdown(device: str, resumes: list[dict], cells: list[dict]) -> str:
    lines = [f"GPU check on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", ""]
    lines += ["| resume check | flags | resumed at | result | seconds |", "| --- | --- | --- | --- | --- |"]
    for r in resumes:
        if "error" in r:
            result = f"failed: {r['error']}"
        elif r["exact"]:
            result = "exact (losses and weights bitwise)"
        else:
            result = f"max loss diff {r['max_loss_diff']:.2e}, max weight diff {r['max_weight_diff']:.2e}"
        at = f"{r.get('resumed_from', '-')} of {r.get('steps', '-')}"
        lines.append(f"| {r['check']} | `{r['flags']}` | {at} | {result} | {r.get('seconds', 0):.0f} |")
    lines += [
        "",
        "| task | batch | precision | compile | data | samples/s | tokens/s | MFU | data wait |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        if "error" in c or "skipped" in c:
            why = c.get("error") or c["skipped"]
            lines.append(f"| {c['task']} | {c['batch']} | {c['precision']} | {c['compile']} | {c['data']} | {why} ||||")
            continue
        mfu = f"{100 * c['mfu']:.1f}%" if "mfu" in c else "-"
        tokens = f"{c['tokens_per_s']:,.0f}" if "tokens_per_s" in c else "-"
        lines.append(
            f"| {c['task']} | {c['batch']} | {c['precision']} | {c['compile']} | {c['data']} | "
            f"{c.get('samples_per_s', float('nan')):,.0f} | {tokens} | {mfu} | {c.get('data_wait_pct', 0):.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU sizes (FSDP2 on gloo; FSDP and compile skipped)")
    parser.add_argument("--budget-s", type=float, default=450, help="skip what would start after this many seconds")
    parser.add_argument("--compile", action="store_true", help="with --smoke: also a torch.compile cell")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON; the .md beside it")
    args = parser.parse_args()
    out = args.out.resolve()
    os.chdir(ROOT)  # the bundled sample's paths are the repository's
    started = time.perf_counter()
    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        raise SystemExit("error: no CUDA device; run with --smoke to check the script on a CPU")
    device = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"kibitz GPU check on {device}, torch {torch.__version__}", flush=True)
    accelerator = "cuda" if gpu else "cpu"
    common = ["chess", "--fabric.accelerator", accelerator, "--fabric.devices", "1", "--fabric.precision", "bf16-mixed"]
    common += ["--log.logger", "csv", "--log.no-progress-bar", "--log.every", "10", "--checkpoint.keep-best", "-1"]
    common += ["--schedule.warmup-steps", "20", "--monitor.histogram-every", "50"]
    if gpu:
        common += ["--data.batch-size", "4096"]
        checks = [("FSDP, bf16-mixed", ["--fabric.strategy", "fsdp"])]
        checks += [("FSDP2, bf16-mixed, sharded", ["--fabric.strategy", "fsdp2", "--checkpoint.sharded"])]
        steps, cell_steps, log_every, tile, eval_rows = 400, 120, 20, 50, 16384
    else:
        common += ["--data.batch-size", "256", "--model.width", "64", "--model.depth", "2"]
        checks = [("FSDP2, bf16-mixed, sharded", ["--fabric.strategy", "fsdp2", "--checkpoint.sharded"])]
        steps, cell_steps, log_every, tile, eval_rows = 24, 12, 4, 1, 1024

    resumes, cells = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, flags in checks:
            try:
                resumes.append(resume_check(name, flags, common, tmp / "resume", steps, timeout=300))
            except Exception as exc:
                resumes.append({"check": name, "flags": " ".join(flags), "error": str(exc)[:200]})
            print(json.dumps(resumes[-1]), flush=True)
        directory = tiled_dataset(tmp / "data", tile, eval_rows)
        compile_ok = gpu or args.compile
        for cell in throughput_cells(args.smoke, compile_ok):
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s:
                task, batch, precision, compiled, on_device = cell
                row = dict(task=task, batch=batch, precision=precision, compile=compiled)
                cells.append(
                    row | {"data": "device" if on_device else "memmap", "skipped": f"budget ({elapsed:.0f} s)"}
                )
            else:
                cells.append(run_cell(cell, directory, tmp / "runs", cell_steps, log_every, accelerator))
            print(json.dumps(cells[-1]), flush=True)
    table = markdown(device, resumes, cells)
    print("\n" + table)
    report = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "resume": resumes}
    report |= {"throughput": cells, "seconds": time.perf_counter() - started}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
