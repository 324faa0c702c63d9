"""Hooks: plain functions `hook(run)` that the loop in train.py calls at named points. They observe: `run` is a
read-only view of the loop's run (`RunView`), and the one thing a hook may do to it is `run.request_stop()`.

Points: `on_train_start`, `after_backward` (the gradients are there, `run.grad_norms` holds their per-layer
norms), `before_log_update` (the same, only on a step that logs, before the optimizer's update), `after_step`
(before this step's log and validation), `on_log` (every log.every steps, the training values in `run.log_row`),
`on_validation_end` (metrics in `run.val_metrics`), `on_train_end`, `on_test_end` (after the test of the best
checkpoint, before the loggers close). A hook may return a dict of values: the loop logs them at
the current step (at `on_log` they join the row, for the hooks after it too). A factory below returns
{point: [functions]} for one concern; `merge` joins them. Nothing here syncs with the device except where it says
so. The monitoring's hooks are in monitor.py; a task adds its own (chess's prediction table, its test pictures)
through Task.hooks.
"""

import copy
import inspect
import math
import sys
import time
from pathlib import Path
from types import MappingProxyType

from tqdm import tqdm
from tqdm.auto import tqdm as tqdm_auto

from config import ConfigError
from kibitz import distributed
from kibitz.contract import line_of

Hooks = dict[str, list]
POINTS = (
    "on_train_start",
    "after_backward",
    "before_log_update",
    "after_step",
    "on_log",
    "on_validation_end",
    "on_train_end",
    "on_test_end",
)


def merge(*groups: Hooks) -> Hooks:
    """One dict of hooks from several; a point the loop never calls (a misspelt name) is an error, not a no-op."""
    merged: Hooks = {}
    for group in groups:
        for point, functions in group.items():
            if point not in POINTS:
                raise ConfigError(
                    f"hooks: {point!r} is not a point the loop calls (expected one of {', '.join(POINTS)})"
                )
            merged.setdefault(point, []).extend(functions)
    return merged


def call(hooks: Hooks, point: str, run) -> None:
    """The loop calls the hooks of `point` with the run's read-only view, and logs what they return."""
    functions = hooks.get(point)
    if not functions:
        return
    logged, view = {}, run.view
    for hook in functions:
        try:
            values = hook(view)
        except Exception as exc:  # a hook's mistake (setting a field, say) is one line, never a traceback
            raise SystemExit(f"error: {failed(hook, point, exc)}") from None
        if values:  # the loop writes them, not the hook
            (run.log_row if point == "on_log" else logged).update(values)
    if logged and run.loggers is not None:
        run.loggers.log(logged, run.progress.step)


def failed(hook, point: str, exc: Exception) -> str:
    """What a hook raised, as one clause naming the hook and the line of its file it came from."""
    code = getattr(inspect.unwrap(hook), "__code__", None)
    line = line_of(code, exc)
    at = f" ({Path(code.co_filename).name} line {line})" if line else ""
    return f"hook {getattr(hook, '__qualname__', hook)} at {point} raised {type(exc).__name__}{at}: {exc}"


class RunView:
    """What a hook sees of the run: every field of train.Run, read-only (dicts as read-only mappings, the progress as
    a copy), plus `step`, `epoch` and `data_wait_s`. `request_stop()` is the one change a hook may make: the loop
    stops after this step (a validation and a checkpoint follow as at any last step)."""

    __slots__ = ("_run",)

    def __init__(self, run):
        object.__setattr__(self, "_run", run)

    def __getattr__(self, name: str):
        value = getattr(self._run, name)
        return MappingProxyType(value) if type(value) is dict else value

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"a hook observes: it cannot set run.{name} (run.request_stop() asks the loop to stop)")

    @property
    def step(self) -> int:
        return self._run.progress.step

    @property
    def epoch(self) -> int:
        return self._run.progress.epoch

    @property
    def progress(self):
        return copy.deepcopy(self._run.progress)

    @property
    def data_wait_s(self) -> float:  # since the last log
        return self._run.window.data_wait_s

    def request_stop(self) -> None:
        self._run.should_stop = True


# ---------------------------------------------------------------- progress, throughput, LR


def throughput() -> Hooks:
    """samples/s, steps/s (tokens/s for a model with `tokens_per_sample`) and the share of time spent
    waiting for data, measured between log intervals (wall clock)."""
    last = {"time": None, "step": 0}

    def start(run) -> None:
        last["time"], last["step"] = time.perf_counter(), run.step

    def measure(run) -> dict:
        now = time.perf_counter()
        steps, row = run.step - last["step"], {}
        if last["time"] is not None and steps > 0:
            seconds = now - last["time"]
            row["perf/steps_per_s"] = steps / seconds
            row["perf/samples_per_s"] = steps * run.cfg.data.batch_size / seconds
            tokens = getattr(distributed.unwrapped(run.model), "tokens_per_sample", None)
            if tokens:  # a sequence model: tokens/s as well
                row["perf/tokens_per_s"] = row["perf/samples_per_s"] * tokens
            row["perf/data_wait_pct"] = 100 * run.data_wait_s / seconds
        last["time"], last["step"] = now, run.step
        return row

    return {"on_train_start": [start], "on_log": [measure]}


def progress_bar(total_steps: int | None) -> Hooks:
    """tqdm on rank 0 (in a notebook, its widget): advances every step (no sync), shows the last logged values. Off a
    terminal (a SLURM .out file, a pipe) it is drawn once per log interval, not ten times a second."""
    bar = {}

    def start(run) -> None:
        if run.fabric.is_global_zero:
            notebook = distributed.in_notebook()  # a widget there (tqdm's auto mode); a forked rank writes lines
            terminal = notebook or sys.stderr.isatty()
            bar["tqdm"] = (tqdm_auto if notebook else tqdm)(
                total=total_steps,
                initial=run.step,
                desc=run.cfg.task,
                unit="step",
                dynamic_ncols=True,
                smoothing=0.1,
                mininterval=0.1 if terminal else math.inf,
            )

    def advance(run) -> None:
        if "tqdm" in bar:
            bar["tqdm"].update(1)

    def show(run) -> None:
        if "tqdm" in bar:
            row = run.log_row
            bar["tqdm"].set_postfix(
                loss=f"{row.get('train/loss', math.nan):.3f}",
                lr=f"{run.lr:.2e}",
                samples_s=f"{row.get('perf/samples_per_s', 0):.0f}",
                refresh=False,
            )
            if bar["tqdm"].mininterval == math.inf:
                bar["tqdm"].refresh()

    def close(run) -> None:
        if "tqdm" in bar:
            bar.pop("tqdm").close()

    return {"on_train_start": [start], "after_step": [advance], "on_log": [show], "on_train_end": [close]}


def curves(min_interval_s: float = 60.0) -> Hooks:
    """`curves.png` in the run folder, drawn from metrics.csv on rank 0: the training loss, the task's validation
    metrics and the learning rate. Redrawn after a validation (at most once a minute, the first a minute in:
    drawing costs a few tenths of a second) and at the end, whatever the logger, so a run without a tracker account
    still has its picture."""
    last = {"drawn": math.inf, "failed": False}

    def start(run) -> None:  # the first picture a minute in: a shorter run draws one, at its end
        last["drawn"] = time.monotonic()

    def draw(run, force: bool = False) -> None:
        due = force or time.monotonic() - last["drawn"] >= min_interval_s
        # not with --log.logger none (no metrics.csv); a picture that cannot be drawn never stops training
        wanted = run.fabric.is_global_zero and run.cfg.log.pictures and due and not last["failed"]
        if wanted and (run.run_dir / "metrics.csv").is_file():
            try:
                plot_curves(run.run_dir / "metrics.csv", run.run_dir / "curves.png", list(run.task.metrics))
            except Exception as exc:
                last["failed"] = True
                print(f"warning: curves.png not drawn ({type(exc).__name__}: {exc}); training continues", flush=True)
            last["drawn"] = time.monotonic()

    return {"on_train_start": [start], "on_validation_end": [draw], "on_train_end": [lambda run: draw(run, force=True)]}


def plot_curves(metrics_csv: Path, path: Path, val_names: list[str]) -> None:
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend and figures are left alone

    from kibitz.tracking.sinks import metric_rows

    series: dict[str, tuple[list, list]] = {}
    for step, name, value in metric_rows(metrics_csv):
        steps, values = series.setdefault(name, ([], []))
        steps.append(int(step))
        values.append(float(value))
    panels = [
        ("training loss", ["train/loss"]),
        ("validation", [n for n in val_names if n in series]),
        ("lr", ["train/lr"]),
    ]
    fig = Figure(figsize=(15, 4))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.14, top=0.9, wspace=0.2)  # fixed: tight_layout costs 0.3 s
    for ax, (title, names) in zip(fig.subplots(1, len(panels)), panels):
        for name in names:
            if name in series:
                ax.plot(*series[name], label=name, marker="o" if title == "validation" else None, markersize=3)
        ax.set_title(title, y=1.0)  # a fixed place: placing it by the ticks' extent costs a tenth of a second an axis
        ax.set(xlabel="step")
        if title != "lr" and any(name in series for name in names):  # nothing logged yet: no legend (and no warning)
            ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 90) -> None:
    """Write a matplotlib Figure as a PNG in one rename: a reader (a browser refreshing it) never sees half."""
    import io

    from kibitz.storage import write_atomic

    picture = io.BytesIO()
    fig.savefig(picture, format="png", dpi=dpi)
    write_atomic(path, picture.getvalue())


def loss_of(result):
    """The loss of what a train_step returned: the loss alone, or (loss, values to log)."""
    return result[0] if isinstance(result, tuple) else result


def improved(score: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if not math.isfinite(score):  # a NaN metric never improves on anything
        return False
    return best is None or (score < best - min_delta if mode == "min" else score > best + min_delta)
