"""Run configuration: one dataclass per concern, a docstring per field (these become `--help`), and
`Task`, the one bundle a task hands the trainer.

Saved as `config.json` in every run folder and inside every checkpoint (configfile.py); `--config FILE` loads one
back as the defaults, and flags given after it override it. A task's config class subclasses RunConfig, adds its
own sections (model, loss, ...) and may replace the defaults of the shared ones."""

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import tyro

Precision = Literal[
    "32-true",
    "32",
    "64-true",
    "64",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "transformer-engine",
    "transformer-engine-float16",
]
Accelerator = Literal["auto", "cpu", "cuda", "gpu", "mps", "tpu"]
Strategy = Literal["auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp", "fsdp2", "deepspeed", "dp"]
Logger = Literal["wandb", "tensorboard", "mlflow", "csv", "none"]
Direction = Literal["min", "max"]


@dataclass
class FabricConfig:
    """Devices, strategy and precision. Left at their defaults, they defer to the launcher:
    `fabric run`, torchrun and SLURM set them, and Fabric refuses code that contradicts them."""

    accelerator: Accelerator = "auto"
    """cpu, cuda, gpu, mps, tpu or auto (CUDA when present, else CPU)."""
    devices: str = "auto"
    """Devices per node: a count ("2"), a list of indices ("0,1"), "-1" for all, or auto (1 on CPU, all GPUs)."""
    num_nodes: int | None = None
    """Number of nodes; unset = 1 or what the launcher says."""
    strategy: Strategy = "auto"
    """auto, ddp, ddp_spawn, deepspeed, ... (Fabric's names); fsdp: Fabric's FSDPStrategy (GPU), each block its
    own unit; fsdp2: torch's fully_shard per block through Fabric's ModelParallelStrategy (also CPU/gloo)."""
    precision: Precision | None = None
    """32-true, bf16-mixed, 16-mixed, bf16-true, 64-true, ...; unset = 32-true or the launcher's choice."""
    matmul_precision: Literal["highest", "high", "medium"] = "high"
    """torch.set_float32_matmul_precision on CUDA: highest, high (TF32) or medium."""


@dataclass
class OptimConfig:
    """AdamW; weight decay applies only to parameters with 2 or more dimensions (not biases)."""

    lr: float = 1e-3
    """Peak learning rate (the schedule scales it; the noam schedule ignores it)."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""


@dataclass
class ScheduleConfig:
    """The learning rate as a pure function of the optimizer step (schedules.py)."""

    kind: Literal["constant", "cosine", "noam"] = "cosine"
    """constant, cosine (linear warmup then cosine decay) or noam."""
    warmup_steps: int = 100
    """Steps of linear warmup (cosine) or the warmup of the noam formula."""
    min_lr_ratio: float = 0.1
    """cosine: the floor, as a fraction of the peak lr."""
    total_steps: int | None = None
    """cosine: the step at which the floor is reached; unset = train.max_steps (or the epochs' steps)."""
    noam_scale: float = 1.0
    """noam: the scale factor."""
    noam_d_model: int | None = None
    """noam: the model width d_model in the formula (a task's config fills it; required for noam)."""


@dataclass
class DataConfig:
    """How the task's datasets are batched (a task adds where its data comes from)."""

    batch_size: int = 512
    """Global batch per optimizer step, over all devices and accumulation micro-batches."""
    eval_batch_size: int = 4096
    """Batch size per device for validation and test."""
    num_workers: int = 0
    """DataLoader worker processes (batches are one memmap gather: 0 is usually fastest)."""
    on_device: bool = False
    """Keep the packed splits in device memory (1 GB per 10M positions); a batch is then one gather there."""


@dataclass
class LogConfig:
    """Tracking. `metrics.csv` in the run folder is always written; `logger` picks the trackers beside it."""

    logger: tuple[Logger, ...] = ("wandb",)
    """Trackers, one or several (`--log.logger tensorboard mlflow`): wandb, tensorboard, mlflow; csv (the CSV alone) or
    none (not even the CSV)."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """offline (no account needed; `wandb sync` uploads later), online or disabled."""
    project: str = "kibitz"
    """wandb project, MLflow experiment."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (a server's http://HOST:PORT, or a database); unset: $MLFLOW_TRACKING_URI, else
    OUT_DIR/mlflow.db beside the runs, which needs no server (`mlflow ui --backend-store-uri sqlite:///OUT_DIR/mlflow.db`)."""
    every: int = 50
    """Log training metrics every N optimizer steps (the only host syncs of the loop)."""
    progress_bar: bool = True
    """A tqdm progress bar on rank 0."""
    pictures: bool = True
    """curves.png and the task's pictures (the built-in tasks' test pictures); --log.no-pictures draws none, for
    sweeps of many short trials (drawing costs a short run more than its training)."""
    checkpoint_artifacts: bool = False
    """wandb and MLflow: log each checkpoint as an artifact (wandb: aliases best, last, step-N); copies every file."""


@dataclass
class MonitorConfig:
    """Watching the model train (monitor.py): statistics computed on the device, sent by a
    background thread; nothing runs on steps that log nothing."""

    histogram_every: int | None = 100
    """Histograms and statistics of every weight and gradient every N optimizer steps (at the first log from each
    multiple of N on); unset = off."""
    bins: int = 64
    """Histogram bins (each tensor over its own range)."""
    max_elements: int | None = None
    """Histogram at most this many elements of each tensor (a strided sample), for huge models."""
    norms: bool = True
    """Per-layer and total gradient norms and update/weight ratios at every log interval."""
    on_nonfinite: Literal["warn", "skip", "stop"] = "warn"
    """A NaN/Inf gradient: warn (at the next log), skip (drop that optimizer step; reads a flag every
    step) or stop (save a checkpoint, exit non-zero)."""
    peak_tflops: float | None = None
    """One device's dense peak for MFU (perf/mfu, per device); unset = Fabric's table for the dtype the precision
    computes in, corrected for H100 NVL and H200 (whose entries there are wrong)."""


@dataclass
class CheckpointConfig:
    """Checkpoints in `<run>/checkpoints/`: `step-N.ckpt`, the best k of them kept, and `last.ckpt`."""

    every: int | None = None
    """Write a checkpoint every N optimizer steps; unset = at every validation."""
    keep_best: int = 2
    """How many step checkpoints to keep, ranked by `rank_by` (-1 keeps all)."""
    rank_by: str | None = None
    """The validation metric that ranks checkpoints and drives early stopping; unset = the task's first."""
    mode: Direction | None = None
    """min or max: whether a lower or a higher `rank_by` is better; unset = the task's direction for it."""
    sharded: bool = False
    """fsdp/fsdp2: every rank writes its own shard into a checkpoint folder (torch.distributed.checkpoint)
    instead of one file gathered on rank 0, for models larger than a host's memory. A folder loads into
    any number of processes (resharded), and into one process without FSDP."""


@dataclass
class TrainConfig:
    """The loop."""

    max_steps: int | None = 1200
    """Stop after this many optimizer steps."""
    max_epochs: int | None = None
    """Stop after this many epochs."""
    max_time: float | None = None
    """Stop after this many minutes (checked at log intervals)."""
    val_every: int | None = 200
    """Validate every N optimizer steps (and at the end of every epoch and of the run); unset = never."""
    val_batches: int | None = None
    """Validate on the first N evaluation batches of the val split on each rank (a fixed subset); unset = all."""
    accumulate: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    skip_grad_sync: bool | None = None
    """With accumulation, all-reduce gradients on the last micro-batch of a step only. Unset = on, except
    under fsdp/fsdp2, where skipping keeps whole (unsharded) gradients in memory until the last one."""
    clip: float | None = 1.0
    """Clip the global gradient norm to this value; unset = no clipping."""
    seed: int = 1337
    """Seed for initialisation and data order."""
    compile: bool = False
    """torch.compile the model before Fabric wraps it."""
    early_stop_patience: int | None = None
    """Stop after this many validations without improvement of checkpoint.rank_by; unset = never."""
    early_stop_min_delta: float = 0.0
    """The least change of checkpoint.rank_by that counts as an improvement."""


OUT_DIR = Path("runs")  # where run folders go unless --out-dir says otherwise


@dataclass
class RunConfig:
    """What every task shares: devices, optimizer, LR schedule, data, logging, checkpoints, the loop."""

    fabric: FabricConfig = field(default_factory=FabricConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: Path = OUT_DIR
    """Folder that holds one folder per run."""
    run_name: str | None = None
    """Name of this run's folder; unset = <task>-<date>-<time> (or the resumed run's)."""
    resume: str | None = None
    """`auto` (the newest loadable checkpoint of `run_name`, or of the newest run), or a checkpoint to continue
    from: a file or folder, an artifact folder holding model.ckpt, or wandb:ARTIFACT[:ALIAS] (a model artifact
    logged with log.checkpoint_artifacts; offline, found in the runs under out_dir)."""
    init_from: str | None = None
    """Start a new run from a checkpoint's weights only (fine-tuning): fresh optimizer, step 0. The same
    sources as `resume`."""
    task: tyro.conf.Suppress[str] = ""
    """The task's name, set from the Task (not a flag; a config class need not set it)."""


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the field."""


class FormChanged(ValueError):
    """A task function's return changed its form after its first, checked call (the loop's one-line error names the
    function and the step)."""

    def __init__(self, function: str, change: str):
        super().__init__(change)
        self.function = function


def leaf_fields(config, prefix: str = ""):
    """(dotted name, type hint, value) of every field of a config, a class or an instance, that is not a section of
    its own; sections are walked into. The value is None for a class. The one walk over a config's fields."""
    cls = config if isinstance(config, type) else type(config)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, value = hints[f.name], None if config is cls else getattr(config, f.name)
        if dataclasses.is_dataclass(hint) or dataclasses.is_dataclass(value):
            yield from leaf_fields(hint if value is None else value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hint, value


def float_fields(config):
    """(dotted name, value) of every float in a config, sections and task sections included."""
    for name, _, value in leaf_fields(config):
        values = value if isinstance(value, (list, tuple)) else [value]
        yield from ((name, v) for v in values if isinstance(v, float))


def strategy_of(f: FabricConfig) -> str:
    """The strategy asked for: `--fabric.strategy`, or where that is auto, the one `fabric run --strategy`
    exported for the processes it launched."""
    launched = os.environ.get("LT_STRATEGY") if os.environ.get("LT_CLI_USED") == "1" else None
    return launched if f.strategy == "auto" and launched else f.strategy


@dataclass(frozen=True)
class Task:
    """Everything the trainer needs from a task, as plain functions and values (see examples/digits.py).

    The metric names in `metrics` are what the evaluation returns, prefixed with "val/"; the first one is what
    checkpoints are ranked by unless checkpoint.rank_by says otherwise. Evaluation: `eval_step` (the trainer runs the
    pass), or a whole `evaluate`."""

    name: str
    config: type
    """The task's RunConfig subclass (its defaults are the task's)."""
    build_model: Callable
    """cfg -> torch.nn.Module."""
    datasets: Callable
    """cfg -> {"train": ..., "val": ..., "test": ...}: each a data.ArrayDataset (a batch is one gather) or any
    torch Dataset with __len__ and a per-example __getitem__ (examples collated into batches of any structure)."""
    train_step: Callable
    """(cfg, model, batch, step, train_size) -> the loss to backpropagate, or (loss, {name: value to log}); the
    values are averaged over each log interval."""
    metrics: dict[str, Direction]
    """The validation metrics that may rank checkpoints, each with whether lower or higher is better."""
    _: dataclasses.KW_ONLY  # the six fields above by position, the rest by keyword: Task(..., eval_step=...)
    eval_step: Callable | None = None
    """(cfg, model, batch) -> {name: tensor}: this batch's sums (a `count` of examples among them); the trainer adds
    them up over the split and its ranks, and each metric is its sum / count (or what `eval_metrics` makes of them)."""
    eval_metrics: Callable | None = None
    """(cfg, {name: summed tensor, on the CPU}) -> metrics, or (metrics, histograms): for metrics other than means."""
    evaluate: Callable | None = None
    """Instead of eval_step: (fabric, cfg, model, loader) -> (metrics, histograms) over the split and the ranks."""
    report: Callable | None = None
    """(cfg, test metrics) -> (title, {row: value}) for the test table (default: the task's name and every metric)."""
    scheduled: Callable | None = None
    """(cfg, step) -> {name: value}: values the task's own schedules apply at a step (logged as schedule/...)."""
    prepare_data: Callable | None = None
    """cfg -> None: build the data on disk if it is missing (rank 0 of each node first, the others after)."""
    hooks: Callable | None = None
    """(cfg, datasets) -> hooks (callbacks.py) of the task's own, such as a table of predictions."""
    check: Callable | None = None
    """cfg -> None: raise ConfigError (config.require) for a bad value of the task's own sections."""
    blocks: tuple[type, ...] = ()
    """The model's repeated blocks: FSDP wraps (shards) each one separately."""
    collate: Callable | None = None
    """[examples] -> batch, for a per-example Dataset (default: torch's default_collate)."""


def for_task(cfg: RunConfig, task: Task) -> RunConfig:
    """The config named by its task: a config class need not repeat the Task's name in a field of its own."""
    if cfg.task not in ("", task.name):
        raise ConfigError(f"task: a config of the {cfg.task!r} task, given to the {task.name!r} task")
    return cfg if cfg.task == task.name else dataclasses.replace(cfg, task=task.name)


def require(ok: bool, name: str, allowed: str, value) -> None:
    """Raise the one-line error of a bad config value: the field, what is allowed, what was given."""
    if not ok:
        raise ConfigError(f"{name}: expected {allowed}, got {value!r}")


def ranking_metric(cfg: RunConfig, task: Task) -> tuple[str, str]:
    """The metric that ranks checkpoints and drives early stopping, with its direction."""
    name = cfg.checkpoint.rank_by or next(iter(task.metrics))
    return name, cfg.checkpoint.mode or task.metrics.get(name, "min")


def check(cfg: RunConfig, task: Task) -> None:
    """Raise ConfigError for the first value outside what is allowed (the choices are Literals, which
    the command line already refuses; a config built in code is checked here), then the task's own check."""
    check_task(task)
    for section in ("fabric", "schedule", "data", "log", "monitor", "checkpoint"):  # a task's own: its check
        for name, hint, value in leaf_fields(getattr(cfg, section), section + "."):
            choices = literal_choices(hint)
            require(not choices or value in choices, name, "one of " + ", ".join(map(str, choices)), value)
    for name, value in float_fields(cfg):  # inf or NaN passes every comparison below (or fails it with no reason)
        require(math.isfinite(value), name, "a finite number", value)
    check_optimisation(cfg)
    check_run(cfg, task)
    if task.check:
        try:
            task.check(cfg)
        except ConfigError:
            raise
        except Exception as exc:  # a task's own check raising a plain ValueError, say: still one line
            raise ConfigError(f"task {task.name}: check raised {type(exc).__name__}: {exc}") from None


def check_optimisation(cfg: RunConfig) -> None:
    """The devices, the optimizer, the schedule and the batches."""
    f, o, s, d, t = cfg.fabric, cfg.optim, cfg.schedule, cfg.data, cfg.train
    devices_ok = f.devices == "auto" or all(p.strip().lstrip("-").isdigit() for p in f.devices.split(","))
    require(devices_ok, "fabric.devices", "auto, a count, -1 or a list like 0,1", f.devices)
    require(f.num_nodes is None or f.num_nodes >= 1, "fabric.num_nodes", "a count >= 1", f.num_nodes)
    # the optimizers' float32 arithmetic divides the lr by (1 - beta1**t): far beyond any useful value it overflows
    require(0 < o.lr <= 1e30, "optim.lr", "a positive number at most 1e30", o.lr)
    require(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", "values in [0, 1)", (o.beta1, o.beta2))
    require(o.eps > 0, "optim.eps", "a positive number", o.eps)
    require(s.total_steps is None or s.total_steps >= 1, "schedule.total_steps", "a count >= 1", s.total_steps)
    require(s.noam_d_model is None or s.noam_d_model >= 1, "schedule.noam_d_model", "a count >= 1", s.noam_d_model)
    require(s.warmup_steps >= 0, "schedule.warmup_steps", "a count >= 0", s.warmup_steps)
    warmup_ok = t.max_steps is None or s.warmup_steps <= t.max_steps
    require(warmup_ok, "schedule.warmup_steps", f"at most train.max_steps ({t.max_steps})", s.warmup_steps)
    require(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", "a value in [0, 1]", s.min_lr_ratio)
    require(s.noam_scale > 0, "schedule.noam_scale", "a positive number", s.noam_scale)
    noam_ok = s.kind != "noam" or (s.noam_d_model or 0) >= 1
    require(noam_ok, "schedule.noam_d_model", "the model width (a count >= 1) for the noam schedule", s.noam_d_model)
    require(d.batch_size > 0, "data.batch_size", "a positive count", d.batch_size)
    require(d.eval_batch_size > 0, "data.eval_batch_size", "a positive count", d.eval_batch_size)
    require(d.num_workers >= 0, "data.num_workers", "a count >= 0", d.num_workers)


def check_run(cfg: RunConfig, task: Task) -> None:
    """The limits, logging, checkpoints, monitoring and names of the run."""
    c, m, t = cfg.checkpoint, cfg.monitor, cfg.train
    require(0 <= t.seed < 2**32, "train.seed", "a seed in [0, 2**32)", t.seed)
    require(cfg.log.every > 0, "log.every", "a positive count", cfg.log.every)
    trackers = cfg.log.logger
    require(
        len(trackers) > 0 and ("none" not in trackers or len(trackers) == 1),
        "log.logger",
        "one or more of wandb, tensorboard, mlflow, csv; or none alone",
        " ".join(trackers),
    )
    require(c.every is None or c.every > 0, "checkpoint.every", "a positive count", c.every)
    require(c.keep_best == -1 or c.keep_best >= 1, "checkpoint.keep_best", "-1 (all) or a count >= 1", c.keep_best)
    require(
        c.rank_by is None or c.rank_by in task.metrics,
        "checkpoint.rank_by",
        "one of " + ", ".join(task.metrics),
        c.rank_by,
    )
    strategy = strategy_of(cfg.fabric)
    sharded_ok = not c.sharded or strategy in ("fsdp", "fsdp2")
    require(sharded_ok, "checkpoint.sharded", "strategy fsdp or fsdp2 (other strategies hold whole models)", strategy)
    require(
        m.histogram_every is None or m.histogram_every >= 1,
        "monitor.histogram_every",
        "a count >= 1",
        m.histogram_every,
    )
    require(m.bins >= 1, "monitor.bins", "a count >= 1", m.bins)
    require(m.max_elements is None or m.max_elements >= 1, "monitor.max_elements", "a count >= 1", m.max_elements)
    require(m.peak_tflops is None or m.peak_tflops > 0, "monitor.peak_tflops", "a positive number", m.peak_tflops)
    init_ok = cfg.init_from is None or cfg.init_from.startswith("wandb:") or Path(cfg.init_from).exists()
    require(
        init_ok,
        "init_from",
        "a checkpoint file or folder, an artifact folder, or wandb:ARTIFACT[:ALIAS]",
        cfg.init_from,
    )
    limited = any(v is not None for v in (t.max_steps, t.max_epochs, t.max_time))
    require(limited, "train.max_steps", "a limit: set max_steps, max_epochs or max_time", None)
    for name in ("max_steps", "max_epochs", "val_every", "val_batches", "accumulate"):
        value = getattr(t, name)
        require(value is None or value >= 1, f"train.{name}", "a count >= 1", value)
    require(t.max_time is None or t.max_time > 0, "train.max_time", "a positive number of minutes", t.max_time)
    require(t.clip is None or t.clip > 0, "train.clip", "a positive norm", t.clip)
    patience = t.early_stop_patience
    require(patience is None or patience >= 1, "train.early_stop_patience", "a count >= 1", patience)
    require(t.early_stop_min_delta >= 0, "train.early_stop_min_delta", "a number >= 0", t.early_stop_min_delta)
    plain = cfg.run_name is None or is_plain_name(cfg.run_name)
    require(plain, "run_name", f"one plain folder name ({PLAIN})", cfg.run_name)


POSITIONAL = "Task(name, config, build_model, datasets, train_step, metrics, eval_step=..., ...)"


def check_task(task: Task) -> None:
    """What a Task declares, before anything runs: a name, its config class, metrics with a direction each, functions
    where functions go. A value in another field's place (a task written for an older order) names the form."""
    require(is_plain_name(task.name), "Task.name", "one plain name (it names the run folders)", task.name)
    field = f"task {task.name}: Task."
    given = task.config if isinstance(task.config, type) else f"an instance of {type(task.config).__name__}"
    is_config = isinstance(task.config, type) and issubclass(task.config, RunConfig)
    require(is_config, field + "config", "the task's RunConfig subclass (the class itself)", given)
    metrics = task.metrics if isinstance(task.metrics, dict) else {}
    named = len(metrics) > 0 and all(isinstance(name, str) for name in metrics)
    expected = f'at least one validation metric, {{"val/name": "min" or "max"}}, the sixth field of {POSITIONAL}'
    require(named, field + "metrics", expected, task.metrics)
    for name, direction in metrics.items():
        prefixed = name.startswith("val/") and len(name) > 4  # what the evaluation returns, as the loop logs it
        require(prefixed, f"{field}metrics", "names of the form val/NAME (NAME: what the evaluation returns)", name)
        require(direction in ("min", "max"), f"{field}metrics[{name!r}]", "'min' or 'max'", direction)
    for name in ("build_model", "datasets", "train_step"):
        require(callable(getattr(task, name)), field + name, "a function", getattr(task, name))
    one_evaluation = callable(task.eval_step) != callable(task.evaluate)
    either = "a function (the trainer runs the evaluation), or else Task.evaluate (a whole pass), not both"
    require(one_evaluation, field + "eval_step", either, task.eval_step)
    for name in ("eval_metrics", "report", "collate", "scheduled", "prepare_data", "hooks", "check"):
        value = getattr(task, name)
        require(value is None or callable(value), field + name, "a function or None", value)


PLAIN = "no /, \\ or ..: the run folder stays inside out_dir; no control character; not starting with -"


def is_plain_name(name) -> bool:
    """One path component that stays where it is put and prints as itself: not empty, no separator, not . or ..,
    no control character (a newline or a terminal escape), no leading - (read as an option by shell commands)."""
    plain = isinstance(name, str) and name.isprintable() and not name.startswith("-")
    return plain and name not in ("", ".", "..") and "\\" not in name and Path(name).name == name


def literal_choices(hint) -> tuple:
    """The values a Literal (or an optional Literal) field allows; () for other types."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    inner = [literal_choices(arg) for arg in typing.get_args(hint) if arg is not type(None)]
    return (*inner[0], None) if len(inner) == 1 and inner[0] and type(None) in typing.get_args(hint) else ()
