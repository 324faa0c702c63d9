"""Tools around a run, as subcommands of train.py:

    python train.py chess evaluate --ckpt runs/x/checkpoints/last.ckpt [--data DIR] [--split test]
    python train.py dvae evaluate --ckpt runs/y/checkpoints/last.ckpt      (token/board accuracy, codebook use)
    python train.py chess lr-find [training flags] [--lr-min 1e-6 --lr-max 1 --steps 100]
    python train.py chess export-config [training flags] > cfg.json

Predicting positions is predict.py.
"""

import csv
import dataclasses
import datetime
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import tyro

import config
import data
from config import ChessConfig, ConfigError, RunConfig
from tasks import TASKS

TOOLS = ("evaluate", "lr-find", "export-config")


def load_checkpoint(path: Path, task: str = "chess") -> tuple[RunConfig, torch.nn.Module]:
    """A checkpoint's config and its model with the saved weights (on the CPU). `path`: a checkpoint
    file or (sharded) folder, an artifact folder, or wandb:ARTIFACT[:ALIAS]."""
    import checkpoints

    if not str(path).startswith("wandb:") and not Path(path).exists():
        raise ConfigError(f"ckpt: {path} is not a checkpoint file or folder")
    try:
        source = checkpoints.resolve_source(str(path), Path("runs"))[0]
        checkpoint = checkpoints.read_metadata(source)
    except Exception as exc:
        raise ConfigError(f"ckpt: {path} cannot be loaded ({type(exc).__name__}: {exc})") from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or not (source.is_dir() or "model" in checkpoint):
        raise ConfigError(f"ckpt: {path} is not a kibitz checkpoint (no saved config and model)")
    saved_task = checkpoint["config"].get("task")
    if saved_task != task:
        raise ConfigError(f"ckpt: {path} is a checkpoint of the {saved_task!r} task, expected {task!r}")
    cfg = config.from_dict(TASKS[task].config, checkpoint["config"])
    model = TASKS[task].build_model(cfg)
    try:
        if source.is_dir():
            checkpoints.load_folder(source, {"model": model})
        else:
            model.load_state_dict(checkpoint["model"])
    except Exception as exc:
        raise ConfigError(f"ckpt: {path} does not fit its saved config ({type(exc).__name__}: {exc})") from None
    return cfg, model.eval()


@dataclass
class EvaluateArgs:
    """Run a checkpoint over a prepared split with the validation metric code; print the metrics table."""

    ckpt: Path
    """The checkpoint (its saved config rebuilds the model)."""
    data: Path | None = None
    """A prepared data directory; unset = the one the model was trained on."""
    split: str = "test"
    """train, val or test."""
    batch_size: int | None = None
    """Positions per batch; unset = the training run's data.eval_batch_size."""
    accelerator: str = "auto"
    """cpu, cuda or auto."""


def evaluate(args: EvaluateArgs, task: str = "chess") -> dict[str, float]:
    import train

    cfg, model = load_checkpoint(args.ckpt, task)
    directory = args.data or cfg.data.dir
    split = data.PackedPositions(directory, args.split, cfg.data.clamp)
    fabric = train.Fabric(accelerator=args.accelerator, devices=1)
    model = fabric.setup_module(model)
    loader = fabric.setup_dataloaders(
        data.make_loader(split, args.batch_size or cfg.data.eval_batch_size, False, 0, 0, 1, drop_last=False),
        use_distributed_sampler=False)
    metrics, _ = TASKS[task].evaluate(fabric, cfg, model, loader)  # the loop's own evaluation pass
    title, rows = TASKS[task].report(cfg, metrics)
    train.print_table(f"{args.split} metrics of {args.ckpt} on {directory} ({title})", rows)
    return metrics


RunT = typing.TypeVar("RunT", bound=RunConfig)


@dataclass
class LRFindArgs(typing.Generic[RunT]):
    """The learning-rate range test: train a fresh model for `steps` steps while the LR grows
    exponentially from lr_min to lr_max; suggest the LR where the smoothed loss falls fastest."""

    run: Annotated[RunT, tyro.conf.arg(name="")] = field(default_factory=ChessConfig)
    lr_min: float = 1e-6
    """The first learning rate."""
    lr_max: float = 1.0
    """The last learning rate."""
    steps: int = 100
    """Optimizer steps of the test."""
    smoothing: float = 0.95
    """Exponential smoothing of the loss curve (0 = none)."""
    diverge: float = 4.0
    """Stop once the smoothed loss exceeds this multiple of its minimum."""


def suggest_lr(lrs: list[float], smoothed: list[float]) -> float:
    """The LR of steepest descent of the smoothed loss against log(lr), between the first 10 % of
    the steps (where the average is still settling) and the loss minimum. Slopes are taken over a
    window of points, not neighbours, so single noisy batches do not decide."""
    first, end = len(lrs) // 10, smoothed.index(min(smoothed))
    window = max(1, len(lrs) // 20)
    if end - window <= first:  # the loss never fell: the smallest LR is the only safe answer
        return lrs[0]
    slopes = {i: (smoothed[i + window] - smoothed[i]) / math.log(lrs[i + window] / lrs[i])
              for i in range(first, end - window + 1)}
    steepest = min(slopes, key=slopes.get)
    return lrs[steepest + window // 2]


def lr_find(args: LRFindArgs) -> float:
    import train

    cfg = args.run
    config.check(cfg)
    if not 0 < args.lr_min < args.lr_max:
        raise ConfigError(f"lr_min/lr_max: expected 0 < lr_min < lr_max, got {args.lr_min}, {args.lr_max}")
    fabric = train.Fabric(accelerator=cfg.fabric.accelerator, devices=1, precision=cfg.fabric.precision)
    fabric.seed_everything(cfg.train.seed)
    data.ensure_prepared(cfg.data.sources, cfg.data.dir)
    split = data.PackedPositions(cfg.data.dir, "train", cfg.data.clamp)
    micro_batch = cfg.data.batch_size // cfg.train.accumulate
    loader = fabric.setup_dataloaders(data.make_loader(split, micro_batch, True, cfg.train.seed, 0, 1, drop_last=True),
                                      use_distributed_sampler=False)
    task = TASKS[cfg.task]
    model = fabric.setup_module(task.build_model(cfg))
    optimizer = fabric.setup_optimizers(train.make_optimizer(model, cfg.optim, fused=fabric.device.type == "cuda"))
    run_dir = cfg.out_dir / f"lr-find-{datetime.datetime.now():%Y%m%d-%H%M%S}"  # never an existing run's folder
    run_dir.mkdir(parents=True, exist_ok=True)

    rows, average, best = [], 0.0, math.inf
    batches, epoch = iter(loader), 0
    for step in range(args.steps):
        lr = args.lr_min * (args.lr_max / args.lr_min) ** (step / max(1, args.steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(cfg.train.accumulate):
            try:
                batch = next(batches)
            except StopIteration:
                epoch += 1
                loader.sampler.start_epoch(epoch)
                batches = iter(loader)
                batch = next(batches)
            loss, _ = task.train_step(cfg, model, batch, step, len(split))
            fabric.backward(loss / cfg.train.accumulate)
            total += loss.item() / cfg.train.accumulate  # a host sync per step is fine for a 100-step test
        if cfg.train.clip is not None:
            fabric.clip_gradients(model, optimizer, max_norm=cfg.train.clip, error_if_nonfinite=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        average = args.smoothing * average + (1 - args.smoothing) * total
        smoothed = average / (1 - args.smoothing ** (step + 1))  # bias-corrected moving average
        rows.append((step, lr, total, smoothed))
        best = min(best, smoothed)
        if not math.isfinite(total) or smoothed > args.diverge * best:
            break
    lrs, smooth = [r[1] for r in rows], [r[3] for r in rows]
    suggestion = suggest_lr(lrs, smooth)
    with open(run_dir / "lr_find.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        writer.writerows(rows)
    plot_lr_curve(lrs, [r[2] for r in rows], smooth, suggestion, run_dir / "lr_find.png")
    print(f"suggested lr: {suggestion:.3g}  (curve: {run_dir / 'lr_find.png'}, {run_dir / 'lr_find.csv'})")
    return suggestion


def plot_lr_curve(lrs, loss, smoothed, suggestion: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, loss, alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, label="smoothed loss")
    ax.axvline(suggestion, color="red", linestyle="--", label=f"suggested lr {suggestion:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_config(cfg: RunConfig) -> str:
    """The full resolved config as JSON; `--config` reads it back unchanged."""
    return json.dumps(config.to_dict(dataclasses.replace(cfg, resume=None)), indent=2)


def main(task: str, tool: str, args: list[str], default: RunConfig) -> None:
    prog = f"train.py {task} {tool}"
    if tool == "evaluate":
        evaluate(tyro.cli(EvaluateArgs, args=args, prog=prog), task)
    elif tool == "lr-find":
        lr_find(tyro.cli(LRFindArgs[TASKS[task].config], default=LRFindArgs(run=default), args=args, prog=prog))
    elif tool == "export-config":
        print(export_config(tyro.cli(TASKS[task].config, default=default, args=args, prog=prog)))
