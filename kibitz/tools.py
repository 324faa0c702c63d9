"""Tools around a run, as subcommands of train.py (or of a task file such as examples/charlm.py):

    python train.py evaluate --ckpt runs/x/checkpoints/last.ckpt [--data.dir DIR] [--split test]
    python train.py chess lr-find [training flags] [--lr-min 1e-6 --lr-max 1 --steps 100]
    python train.py chess export-config [training flags] > cfg.json

evaluate takes the task from the checkpoint; lr-find is a hook on the ordinary loop (train.lr_find),
so it honours devices, strategy and precision. Predicting chess positions is predict.py.
"""

import csv
import dataclasses
import io
import json
import math
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from lightning_fabric import Fabric

import config
import data
from config import Accelerator, ConfigError, DataConfig, RunConfig, Task
from kibitz import checkpoints, configfile, evaluation, runs, storage

TOOLS = {
    "evaluate": "run a checkpoint over a split and print its metrics (the task comes from the checkpoint)",
    "lr-find": "the learning-rate range test: a short run with an exponentially growing LR",
    "export-config": "print the resolved config as JSON (for --config)",
    "export-checkpoint": "write a folder of shards (--checkpoint.sharded) as one checkpoint file",
    "convert-checkpoint": "rewrite a checkpoint of kibitz's previous format (--trust: runs the old file's code)",
}


def checkpoint_task(path: Path, out_dir: Path) -> tuple[str | None, str | None]:
    """The task name and task file a checkpoint records (Nones if it records none; the file also when it is not a
    printable path, which is only ever shown in a message)."""
    source = runs.resolve_source(str(path), out_dir)[0]
    metadata = checkpoints.checked_metadata(source, f"ckpt: {path} cannot be loaded")
    saved = metadata.get("config")
    name = saved.get("task") if isinstance(saved, dict) else None
    if name is not None and not config.is_plain_name(name):
        raise ConfigError(f"ckpt: {path} records the task name {name!r}, which is not one plain name")
    recorded = metadata.get("task")
    file = recorded.get("file") if isinstance(recorded, dict) else None
    return name, file if isinstance(file, str) and file.isprintable() else None


def load_checkpoint(path: Path, task: Task, out_dir: Path = config.OUT_DIR) -> tuple[RunConfig, torch.nn.Module]:
    """A checkpoint's config and its model with the saved weights (on the CPU), the whole checkpoint verified first.
    `path`: a checkpoint file or (sharded) folder, an artifact folder, or wandb:ARTIFACT[:ALIAS] (looked for in
    `out_dir`'s runs)."""
    if not str(path).startswith("wandb:") and not Path(path).exists():
        raise ConfigError(f"ckpt: {path} is not a checkpoint file or folder")
    source, failure = runs.resolve_source(str(path), out_dir)[0], f"ckpt: {path} cannot be loaded"
    try:
        shards = storage.verify(source)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{failure} ({checkpoints.reason(exc)})") from None
    checkpoint = checkpoints.checked_metadata(source, failure)
    saved = checkpoint.get("config")
    if not isinstance(saved, dict) or not (shards or isinstance(checkpoint.get("model"), dict)):
        raise ConfigError(f"ckpt: {path} is not a kibitz checkpoint (no saved config and model)")
    if saved.get("task") != task.name:
        raise ConfigError(f"ckpt: {path} is a checkpoint of the {saved.get('task')!r} task, expected {task.name!r}")
    cfg = configfile.from_dict(task.config, saved)
    model = model_for(path, task, cfg, checkpoints.saved_shapes(source, shards))
    try:
        if shards is not None:
            checkpoints.load_folder(source, {"model": model}, shards)
        else:
            model.load_state_dict(checkpoint["model"])
    except Exception as exc:
        raise ConfigError(
            f"ckpt: {path} cannot be loaded into the model of its config ({checkpoints.reason(exc)})"
        ) from None
    return cfg, model.eval()


def model_for(path: Path, task: Task, cfg: RunConfig, saved: dict | None) -> torch.nn.Module:
    """The model a checkpoint's config describes, built only once its tensors are known to match what the checkpoint
    holds and to fit in this machine's memory: a config is data, and a hostile one could ask for any size."""
    try:
        with torch.device("meta"):  # names and shapes, no memory
            outline = task.build_model(cfg)
        shapes = {name: tuple(t.shape) for name, t in outline.state_dict().items()}
        size = sum(t.numel() * t.element_size() for t in outline.state_dict().values())
    except Exception as exc:
        raise ConfigError(f"ckpt: {path}: its config builds no model ({checkpoints.reason(exc)})") from None
    saved = {name: tuple(shape) for name, shape in (saved or {}).items()}
    if shapes != saved:
        differ = sorted(name for name in {*shapes, *saved} if shapes.get(name) != saved.get(name))
        raise ConfigError(
            f"ckpt: {path}: its config builds a model whose {differ[0]} is {shapes.get(differ[0])}, but the "
            f"checkpoint holds {saved.get(differ[0])} (a config that does not match its weights)"
        )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if size > memory:
        raise ConfigError(f"ckpt: {path}: its model needs {size / 2**30:.1f} GiB, more than this machine's memory")
    return task.build_model(cfg)


DataT = typing.TypeVar("DataT", bound=DataConfig)


@dataclass
class EvaluateArgs(typing.Generic[DataT]):
    """Run a checkpoint over a split with the validation metric code; print the metrics table."""

    ckpt: Path
    """The checkpoint (its saved config rebuilds the model and names the task)."""
    data: DataT = None  # type: ignore[assignment]
    """The data: the checkpoint's by default; any of its fields may be changed (say --data.dir)."""
    split: Literal["train", "val", "test"] = "test"
    """The split to evaluate."""
    batch_size: int | None = None
    """Examples per batch; unset = the training run's data.eval_batch_size."""
    accelerator: Accelerator = "auto"
    """cpu, cuda or auto."""
    out_dir: Path = config.OUT_DIR
    """Where a wandb:NAME[:ALIAS] checkpoint is looked for offline and fetched to (the training runs' --out-dir)."""


@dataclass
class ExportArgs:
    """Write a sharded checkpoint folder as one checkpoint file: evaluate, predict.py, --init-from and anyone
    without torch.distributed read it like any other (resume from the folder itself: any number of processes)."""

    ckpt: Path
    """The folder of shards (runs/<run>/checkpoints/step-N.ckpt with --checkpoint.sharded)."""
    out: Path
    """The file to write (its folder must exist); an existing file is replaced only once the new one is whole."""


def export_checkpoint(args: ExportArgs) -> Path:
    """Every item of the shards, read whole through kibitz's checked reader (torch's own converter, dcp_to_torch_save,
    unpickles the folder's index and values without restriction), with what Fabric keeps beside them in meta.pt (the
    config, progress, RNG states, the task): a whole kibitz checkpoint in one file."""
    folder, out = args.ckpt, args.out
    if not (folder / "meta.pt").is_file() or not list(folder.glob("*.distcp")):
        raise ConfigError(f"ckpt: expected a folder of shards (meta.pt and *.distcp files), got {folder}")
    if not out.parent.is_dir() or out.is_dir():
        raise ConfigError(f"out: expected a file name in an existing folder, got {out}")
    tmp = out.with_name(out.name + ".tmp")
    try:
        state = storage.read_shards(folder, storage.verify(folder))
        state.update(storage.torch_file(folder / "meta.pt", checked=True))
        torch.save(state, tmp)
        storage.fsync(tmp)
        storage.replace(tmp, out)
    except Exception as exc:  # a damaged shard or meta.pt, a full disk: one line, nothing half-written left
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: cannot export {folder} to {out} ({type(exc).__name__}: {exc})") from None
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB): the model whole, with its run's config and progress")
    return out


@dataclass
class ConvertArgs:
    """Rewrite a checkpoint of kibitz's previous format (RNG states pickled as numpy objects, which the safe loader
    refuses) in today's, which holds only tensors and plain data. Reading the old file needs torch's unrestricted
    loader, which runs any code the file holds: convert only files you trust (your own runs')."""

    ckpt: Path
    """The old checkpoint: a file, or a folder of shards."""
    out: Path
    """Where to write the converted checkpoint (a file or folder as the old one; its parent folder must exist)."""
    trust: bool = False
    """I trust this file: load it with the unrestricted loader, running whatever code it holds."""


def convert_checkpoint(args: ConvertArgs) -> Path:
    old, out = args.ckpt, args.out
    if not args.trust:
        raise ConfigError(
            f"trust: reading {old} in the old format runs any code it holds; add --trust only for a file you trust"
        )
    if not old.exists():
        raise ConfigError(f"ckpt: {old}: no such checkpoint file or folder")
    if not out.parent.is_dir() or out.exists() and out.is_dir() != old.is_dir():
        raise ConfigError(f"out: expected a new {'folder' if old.is_dir() else 'file'} name in an existing folder")
    tmp = out.with_name(out.name + ".tmp")
    storage.remove(tmp)
    try:
        if old.is_dir():  # a new folder written from the values read, never the old files copied
            import torch.distributed.checkpoint as dcp

            shards = trusted_shards(old)
            meta = torch.load(old / "meta.pt", map_location="cpu", weights_only=False)  # --trust: the user's word
            with storage.without_process_group_warning():
                dcp.save(shards, checkpoint_id=tmp, no_dist=True)
            torch.save(as_data(meta), tmp / "meta.pt")
            (tmp / storage.CHECKSUMS).write_text(json.dumps(storage.folder_checksums(tmp), indent=1))
        else:
            state = torch.load(old, map_location="cpu", weights_only=False)  # --trust: the user's word
            torch.save(as_data(state), tmp)
        storage.verify(tmp)  # what it wrote is data: anything else in the old file was not a kibitz state
        storage.fsync_tree(tmp)
        storage.replace(tmp, out)
    except Exception as exc:
        storage.remove(tmp)
        raise SystemExit(f"error: cannot convert {old} ({checkpoints.reason(exc)})") from None
    print(f"wrote {out}: the same checkpoint as data only (loads with weights_only=True)")
    return out


def trusted_shards(folder: Path) -> dict:
    """Every item of a folder of shards with torch's own reader and planner, which unpickle without restriction:
    only for `--trust`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state = {}
    with storage.ordinary_errors():
        _load_state_dict(
            state, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True
        )
    return state


def as_data(state):
    """The previous format's RNG states as lists (what distributed.rng_states writes today)."""
    import numpy as np

    for rank_state in state.get("rng", []) if isinstance(state, dict) else []:
        if isinstance(rank_state.get("python"), tuple):
            version, words, gauss = rank_state["python"]
            rank_state["python"] = [version, list(words), gauss]
        if isinstance(rank_state.get("numpy"), tuple):
            kind, keys, position, has_gauss, cached = rank_state["numpy"]
            rank_state["numpy"] = [str(kind), np.asarray(keys).tolist(), int(position), int(has_gauss), float(cached)]
    return state


def fail(message: str) -> int:
    """Print a one-line error in one write (the lines of two ranks never interleave) and return the exit code
    of every error kibitz reports, whatever its kind: 2 (1 is left to a crash, a bug)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    return 2


def exit_code(exc: BaseException) -> int:
    """How `train.py` ends on an error: one line and 2 for ours, whatever its kind (a bad value, a damaged file, a full
    disk, a non-finite stop); quietly 2 where another rank failed and said so; 130 on an early Ctrl-C."""
    if isinstance(exc, ConfigError):
        return fail(f"error: {exc}")
    if isinstance(exc, KeyboardInterrupt):  # before the run's own handler is in place (or in a tool): nothing to save
        return fail("interrupted") + 128
    if isinstance(exc.code, str):
        return fail(exc.code)
    if exc.code == 2:
        return 2
    raise exc


def run_tool(tool: str, args, task: Task) -> None:
    if tool == "evaluate":
        evaluate(args, task)
    elif tool == "export-checkpoint":
        export_checkpoint(args)
    elif tool == "convert-checkpoint":
        convert_checkpoint(args)
    else:
        print(export_config(args))


def print_table(title: str, metrics: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"  {'metric':<24}{'value':>12}")
    for name, value in metrics.items():
        print(f"  {name:<24}{value:>12.4f}" if isinstance(value, float) else f"  {name:<24}{value:>12}")


def evaluate(args: EvaluateArgs, task: Task) -> dict[str, float]:
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive count (unset: the run's), got {args.batch_size}")
    cfg, model = load_checkpoint(args.ckpt, task, args.out_dir)
    if args.data is not None:
        cfg = dataclasses.replace(cfg, data=args.data)
    dataset = task.datasets(cfg)[args.split]
    fabric = Fabric(accelerator=args.accelerator, devices=1)
    model = fabric.setup_module(model)
    batch_size = args.batch_size or cfg.data.eval_batch_size
    loader = data.eval_loader(fabric, dataset, batch_size=batch_size, collate=task.collate)
    metrics, _ = evaluation.evaluate(fabric, cfg, task, model, loader)  # the loop's own evaluation pass
    title, rows = evaluation.report(task, cfg, metrics)
    where = getattr(cfg.data, "dir", None)
    print_table(f"{args.split} metrics of {args.ckpt}{f' on {where}' if where else ''} ({title})", rows)
    return metrics


RunT = typing.TypeVar("RunT", bound=RunConfig)


@dataclass
class LRFindArgs(typing.Generic[RunT]):
    """The learning-rate range test: train a fresh model for `steps` steps while the LR grows
    exponentially from lr_min to lr_max; suggest the LR where the smoothed loss falls fastest."""

    run: Annotated[RunT, tyro.conf.arg(name="")]
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

    def lr_at(self, step: int) -> float:
        return self.lr_min * (self.lr_max / self.lr_min) ** (step / max(1, self.steps - 1))


def lr_find_config(args: LRFindArgs, task: Task) -> RunConfig:
    """The run lr-find trains: the given config for `steps` steps at a constant LR (set by the test), logging every
    step, without validation, checkpoints or histograms; MLflow is the one tracker kept (an lr-find is a run too)."""
    if args.steps < 2:
        raise ConfigError(f"steps: expected at least 2 steps for a range of learning rates, got {args.steps}")
    if not 0 <= args.smoothing < 1:
        raise ConfigError(f"smoothing: expected a value in [0, 1) (0 = none), got {args.smoothing}")
    if not args.diverge > 1:
        raise ConfigError(f"diverge: expected a multiple of the minimum loss above 1, got {args.diverge}")
    if not 0 < args.lr_min < args.lr_max <= 1e30:
        raise ConfigError(f"lr_min/lr_max: expected 0 < lr_min < lr_max <= 1e30, got {args.lr_min}, {args.lr_max}")
    cfg = config.for_task(args.run, task)
    return dataclasses.replace(
        cfg,
        resume=None,
        init_from=None,
        train=dataclasses.replace(
            cfg.train, max_steps=args.steps, max_epochs=None, max_time=None, val_every=None, early_stop_patience=None
        ),
        schedule=dataclasses.replace(cfg.schedule, kind="constant", warmup_steps=0),
        log=dataclasses.replace(
            cfg.log, every=1, logger=("mlflow",) if "mlflow" in cfg.log.logger else ("none",), progress_bar=False
        ),
        monitor=dataclasses.replace(cfg.monitor, histogram_every=None, norms=False, on_nonfinite="warn"),
    )


def suggest_lr(lrs: list[float], smoothed: list[float]) -> float:
    """The LR of steepest descent of the smoothed loss against log(lr), between the first 10 % of
    the steps (where the average is still settling) and the loss minimum. Slopes are taken over a
    window of points, not neighbours, so single noisy batches do not decide."""
    first, end = len(lrs) // 10, smoothed.index(min(smoothed))
    window = max(1, len(lrs) // 20)
    if end - window <= first:  # the loss never fell: the smallest LR is the only safe answer
        return lrs[0]
    slopes = {
        i: (smoothed[i + window] - smoothed[i]) / math.log(lrs[i + window] / lrs[i])
        for i in range(first, end - window + 1)
    }
    steepest = min(slopes, key=slopes.get)
    return lrs[steepest + window // 2]


def lr_range(args: LRFindArgs, run_dir: Path, result: dict) -> dict:
    """The hook of lr-find (the loop logs every step): record (step, lr, loss, smoothed loss), ask to
    stop once the loss diverges, and at the end write the curve and put the suggestion in `result`."""
    rows, state = [], {"average": 0.0, "best": math.inf}

    def record(run) -> None:
        loss = run.log_row["train/loss"]
        state["average"] = args.smoothing * state["average"] + (1 - args.smoothing) * loss
        smoothed = state["average"] / (1 - args.smoothing ** (len(rows) + 1))  # bias-corrected moving average
        rows.append((run.step - 1, run.lr, loss, smoothed))
        state["best"] = min(state["best"], smoothed)
        if not math.isfinite(loss) or smoothed > args.diverge * state["best"]:
            run.request_stop()

    def finish(run) -> None:
        lrs, smooth = [r[1] for r in rows], [r[3] for r in rows]
        result["suggestion"] = suggestion = suggest_lr(lrs, smooth)
        if run.fabric.is_global_zero:
            table = io.StringIO()
            csv.writer(table).writerows([["step", "lr", "loss", "smoothed_loss"], *rows])
            storage.write_atomic(run_dir / "lr_find.csv", table.getvalue())
            plot_lr_curve(lrs, [r[2] for r in rows], smooth, suggestion, run_dir / "lr_find.png")
            print(f"suggested lr: {suggestion:.3g}  (curve: {run_dir / 'lr_find.png'}, {run_dir / 'lr_find.csv'})")

    return {"on_log": [record], "on_train_end": [finish]}


def plot_lr_curve(lrs, loss, smoothed, suggestion: float, path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend is left alone

    from callbacks import save_figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(lrs, loss, alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, label="smoothed loss")
    ax.axvline(suggestion, color="red", linestyle="--", label=f"suggested lr {suggestion:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    ax.legend()
    save_figure(fig, path, dpi=100)


def export_config(cfg: RunConfig) -> str:
    """The full resolved config as JSON; `--config` reads it back unchanged."""
    return json.dumps(configfile.to_dict(dataclasses.replace(cfg, resume=None)), indent=2)
