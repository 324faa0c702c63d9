"""The task contract, checked before training: what a task's functions return, so that a mistake in a task is
one line naming the task, the function and what it gave, before a minute of training is spent (not a traceback
at the first validation, or after the whole run at the test).

`datasets` and `build_model` are checked as the run is set up; `evaluate` and `report` by a dry run over one batch
of the validation split at the start; `train_step`'s return at the first step (its shapes and types only: no host
sync). None of it changes the run: the dry run restores every RNG stream and leaves weights, optimizer and the
training data's order untouched.
"""

import contextlib
import inspect
import logging
import os
import random
import re
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

import data
from config import ConfigError, FormChanged
from kibitz import evaluation

SPLITS = ("train", "val", "test")


def where(task, function: str) -> str:
    """`task NAME: FUNCTION (FILE)`: how every message of this module starts."""
    code = code_of(task, function)
    return f"task {task.name}: {function}" + (f" ({Path(code.co_filename).name})" if code else "")


def code_of(task, function: str):
    """The code object of a task's function, under its decorators (torch.no_grad, functools.wraps)."""
    return getattr(inspect.unwrap(getattr(task, function)), "__code__", None)


def task_file(task) -> Path:
    """The file that defines a task (the one its build_model is in)."""
    return Path(inspect.getsourcefile(task.build_model)).resolve()


def failed(task, function: str, exc: Exception) -> ConfigError:
    """An exception raised inside a task's function as one line, with the task file's line it came from; a fault
    of the data it read named as itself."""
    fault = data_fault(task, exc, f"in the dry run of {function}, before training")
    if fault is not None:
        return ConfigError(fault)
    line = line_of(code_of(task, function), exc)
    at = f" at line {line}" if line else ""
    return ConfigError(f"{where(task, function)} raised {type(exc).__name__}{at}: {said(exc)}")


def said(exc: Exception) -> str:
    """An exception's message, or what its kind means where it has none (a StopIteration out of a reader)."""
    if str(exc):
        return str(exc)
    if isinstance(exc, StopIteration):
        return "an iterator ended before its first item (an empty file or stream?)"
    return "(no message)"


def line_of(code, exc: Exception) -> int | None:
    """The last line of `code`'s file that the exception passed through (a task's function, a hook)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if code and f.filename == code.co_filename]
    return frames[-1].lineno if frames else None


def call(task, function: str, *args):
    try:
        return getattr(task, function)(*args)
    except ConfigError:
        raise
    except Exception as exc:
        raise failed(task, function, exc) from None


def check_datasets(task, datasets, on_device: bool = False) -> None:
    quiet_library_read_errors()
    if not isinstance(datasets, dict) or any(split not in datasets for split in SPLITS):
        got = sorted(datasets) if isinstance(datasets, dict) else type(datasets).__name__
        raise ConfigError(f"{where(task, 'datasets')}: expected a dict with the splits train, val and test, got {got}")
    for split in SPLITS:
        if isinstance(datasets[split], (tuple, list)):  # (x, y) arrays, say: a sequence of two "examples"
            raise ConfigError(
                f"{where(task, 'datasets')}: the {split} split is a {type(datasets[split]).__name__}; expected a "
                "dataset (for arrays: data.ArrayDataset(x, y))"
            )
        map_style = hasattr(datasets[split], "__len__") and hasattr(datasets[split], "__getitem__")
        if not map_style and not data.is_stream(datasets[split]):
            raise ConfigError(
                f"{where(task, 'datasets')}: the {split} split is neither a map-style dataset (__len__ and "
                f"__getitem__) nor a stream (a torch IterableDataset); got {type(datasets[split]).__name__}"
            )
        if on_device and not isinstance(datasets[split], data.ArrayDataset):
            raise ConfigError(
                f"data.on_device: expected data.ArrayDataset splits (held whole on the device), got a "
                f"{type(datasets[split]).__name__} for {split}"
            )


def check_model(task, model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{where(task, 'build_model')}: expected a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"{where(task, 'build_model')}: the model has no trainable parameters")


def check_train_step(task, result) -> tuple[str, ...]:
    """The names of the values a train_step logs: the loss alone (a scalar tensor with a gradient), or
    (loss, {name: scalar tensor or number}). Shapes and types only: reading a value would sync the device."""
    expected = "the loss (a scalar tensor with a gradient), or (loss, {name: value to log})"
    loss, logged = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    if not torch.is_tensor(loss) or loss.dim() != 0 or not loss.is_floating_point() or not loss.requires_grad:
        if isinstance(result, (tuple, list)):
            got = f"({describe(loss)}, ...)" if len(result) == 2 else f"a {type(result).__name__} of {len(result)}"
        else:
            got = describe(result) + (" without a gradient" if torch.is_tensor(loss) and loss.dim() == 0 else "")
        raise ConfigError(f"{where(task, 'train_step')}: expected {expected}, got {got}")
    if logged is None:
        return ("loss",)
    if not isinstance(logged, dict):  # (loss, a tensor of values) was a form of its own until 2026-12
        raise ConfigError(f"{where(task, 'train_step')}: expected {expected}, got (loss, {describe(logged)})")
    bad = [k for k, v in logged.items() if not isinstance(k, str) or torch.is_tensor(v) and v.numel() != 1]
    if bad or not all(torch.is_tensor(v) or isinstance(v, (int, float)) for v in logged.values()):
        raise ConfigError(f"{where(task, 'train_step')}: expected {{name: a scalar tensor or number}} to log")
    return ("loss", *logged)


def checked_train_step(run, *args):
    """The task's first train_step, checked: an exception in it, or a wrong return, is one line. Its return fixes
    the names the run logs (a resumed run has its sums already)."""
    result = call(run.task, "train_step", *args)
    run.train_fields = check_train_step(run.task, result)
    loss = result[0] if isinstance(result, tuple) else result
    if loss.device.type != run.fabric.device.type:  # backward would fail far from the task's code
        raise ConfigError(
            f"{where(run.task, 'train_step')}: expected the loss on {run.fabric.device}, got {loss.device}"
        )
    window = run.window
    if window.sums.numel() != len(run.train_fields):
        window.sums = window.sums.new_zeros(len(run.train_fields))
        window.sums_before_step = window.sums.clone()
    return result


def describe(value) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    return f"a {type(value).__name__}"


def describe_step(result) -> str:
    """What a train_step returned, in words: the loss alone, or (loss, [the names it logs])."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        return f"(loss, {list(result[1])})"
    return describe(result)


def check_evaluation(run) -> None:
    """A dry run of `evaluate` and `report` over one batch of the validation split (the test split without
    validation): every metric the task names returned, each a number."""
    task, cfg, fabric = run.task, run.cfg, run.fabric
    split = "val" if cfg.train.val_every is not None else "test"
    batch_size, on_device = cfg.data.eval_batch_size, cfg.data.on_device
    loader = data.eval_loader(
        fabric, run.datasets[split], batch_size=batch_size, collate=task.collate, on_device=on_device, max_batches=1
    )
    function = "evaluate" if task.evaluate else "eval_metrics" if task.eval_metrics else "eval_step"
    with same_random_numbers():
        try:
            result = evaluation.evaluate(fabric, cfg, task, run.model, loader)
        except ConfigError:
            raise
        except Exception as exc:
            raise failed(task, "evaluate" if task.evaluate else "eval_step", exc) from None
    if not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[0], dict):
        raise ConfigError(f"{where(task, function)}: expected (metrics dict, histograms), got {describe(result)}")
    metrics = result[0]
    missing = [name.removeprefix("val/") for name in task.metrics if name.removeprefix("val/") not in metrics]
    if missing:
        raise ConfigError(
            f"{where(task, function)}: returned no {', '.join(missing)} (Task.metrics names val/{missing[0]}); it "
            f"returned {', '.join(metrics) or 'nothing'}"
        )
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{where(task, function)}: metric {name!r} is {describe(value)}; expected a Python number "
                "(reduce over ranks, then .item())"
            )
    if not task.report:
        return
    report = call(task, "report", cfg, metrics)
    if not isinstance(report, tuple) or len(report) != 2 or not isinstance(report[1], dict):
        raise ConfigError(f"{where(task, 'report')}: expected (title, {{row name: value}}), got {describe(report)}")


@contextlib.contextmanager
def same_random_numbers():
    """Whatever the block draws, every RNG stream (python, numpy, torch, cuda) continues afterwards as before it."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


# ---------------------------------------------------------------- a task's mistake at any step

TORCH_COLLATE = str(Path("torch", "utils", "data", "_utils", "collate.py"))
TORCH_DATA = (  # a batch read through a DataLoader
    str(Path("torch", "utils", "data", "dataloader.py")),
    str(Path("torchdata", "stateful_dataloader", "stateful_dataloader.py")),
)
TASK_FUNCTIONS = ("train_step", "eval_step", "evaluate", "eval_metrics", "report", "collate", "scheduled", "hooks")
REPOSITORY = Path(__file__).resolve().parent.parent
TRAINER_FILES = {  # the trainer's own code: a frame in it is never the task's
    str(path) for path in [*REPOSITORY.glob("*.py"), *REPOSITORY.glob("kibitz/**/*.py")] if path.stem != "model"
} - {str(REPOSITORY / "losses.py")}


def blame(run, exc: Exception) -> str | None:
    """An exception from the task's code at any step, as `WHO raised TYPE WHEN (FILE line L): MESSAGE`: a Dataset's
    __getitem__ (with its index), the collate, a DataLoader worker, or the task's function; None when no task code is
    to blame (the trainer's own errors keep their traceback)."""
    if isinstance(exc, ConfigError):  # one line already, naming what it is about
        return str(exc)
    frames = list(traceback.walk_tb(exc.__traceback__))
    when = moment(run, frames)
    if isinstance(exc, FormChanged):
        return f"task {run.task.name}: {exc.function} {exc} ({when})"
    fault = data_fault(run.task, exc, when)
    if fault is not None:
        return fault
    functions = {code_of(run.task, name): name for name in TASK_FUNCTIONS if getattr(run.task, name, None)}
    named = [functions[frame.f_code] for frame, _ in frames if frame.f_code in functions]
    if named:
        return f"task {run.task.name}: {named[0]} raised {type(exc).__name__} {when}{at(frames)}: {said(exc)}"
    return None


def data_fault(task, exc: Exception, when: str) -> str | None:
    """A fault in reading the data, named as itself: a DataLoader worker, a Dataset's __getitem__, the task's collate
    or torch's default one (not the function that asked for the batch). None if the data is not to blame."""
    if (worker := worker_failure(exc)) is not None:
        return f"{worker} ({when})"
    frames, kind = list(traceback.walk_tb(exc.__traceback__)), type(exc).__name__
    items = [
        frame for frame, _ in frames if frame.f_code.co_name == "__getitem__" and is_users(frame.f_code.co_filename)
    ]
    if items:
        return f"{dataset_item(items[-1])} raised {kind} {when}{at(frames)}: {said(exc)}"
    collate = code_of(task, "collate") if task.collate else None
    if collate is not None and any(frame.f_code is collate for frame, _ in frames):
        return f"task {task.name}: collate raised {kind} {when}{at(frames)}: {said(exc)}"
    if any(frame.f_code.co_filename.endswith(TORCH_COLLATE) for frame, _ in frames):
        return f"collating a batch (torch's default_collate) raised {kind} {when}: {said(exc)}"
    if any(frame.f_code.co_filename.endswith(TORCH_DATA) for frame, _ in frames):  # a stream's own read, say
        own = [frame.f_code.co_name for frame, _ in frames if is_users(frame.f_code.co_filename)]
        what = file_being_read(frames) or "the data"
        return f"reading {what}{f' ({own[-1]})' if own else ''} raised {kind} {when}{at(frames)}: {said(exc)}"
    return None


def file_being_read(frames) -> str | None:
    """The file a library's reader had open when it raised (Hugging Face's JSON reader names it `file`), if any."""
    for frame, _ in reversed(frames):
        for name in ("file", "filepath", "filename", "path"):
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and Path(value).is_file():
                return str(value)
    return None


class LibraryReadErrors(logging.Filter):
    """Drops Hugging Face's own log line about a file it failed to read: the run's one line names the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("datasets.") and str(record.msg).startswith("Failed to "))


def quiet_library_read_errors() -> None:
    """Once Hugging Face `datasets` is imported (by a task's datasets), its read errors are said by the run alone."""
    if "datasets" not in sys.modules:
        return
    for handler in logging.getLogger("datasets").handlers:
        if not any(isinstance(f, LibraryReadErrors) for f in handler.filters):
            handler.addFilter(LibraryReadErrors())


def moment(run, frames) -> str:
    """`at step N`, `in the validation after step N` or `in the test`, from the loop's functions on the stack."""
    names = {frame.f_code.co_name for frame, _ in frames if frame.f_code.co_filename in TRAINER_FILES}
    if "test" in names:
        return "in the test"
    if "validate" in names:
        return f"in the validation after step {run.progress.step}"
    return f"at step {run.progress.step + 1}"


def is_users(filename: str) -> bool:
    """A frame of the task's own code: not Python's, not a library's, not the trainer's."""
    python = filename.startswith(("<", sys.base_prefix, sys.prefix)) or "site-packages" in filename
    compiled = not Path(filename).is_absolute()  # a compiled library's own source name (pyarrow/error.pxi)
    return not python and not compiled and filename not in TRAINER_FILES


def at(frames: list) -> str:
    """` (FILE line L)`: the deepest frame of the task's own code the exception passed through."""
    own = [(frame, line) for frame, line in frames if is_users(frame.f_code.co_filename)]
    if not own:
        return ""
    frame, line = own[-1]
    return f" ({Path(frame.f_code.co_filename).name} line {line})"


def dataset_item(frame) -> str:
    """`NAME.__getitem__(INDEX)`: the Dataset's class and the index its __getitem__ was called with."""
    names = frame.f_code.co_varnames[: frame.f_code.co_argcount]
    owner = type(frame.f_locals.get(names[0])).__name__ if names else "Dataset"
    index = frame.f_locals.get(names[1]) if len(names) > 1 else None
    return f"{owner}.__getitem__({index!r})"


def worker_failure(exc: Exception) -> str | None:
    """A DataLoader worker's end: killed (by the out-of-memory killer, say), or its exception, which torch raises
    again here with the worker's traceback as text."""
    text = str(exc)
    if "DataLoader worker" in text and ("exited unexpectedly" in text or "killed by signal" in text):
        signal = re.search(r"killed by signal: (\w+)", text)
        how = f"killed by signal {signal[1]}" if signal else "killed, or it crashed"
        return f"a DataLoader worker died ({how}, possibly out of memory)"
    if "Original Traceback" not in text:
        return None
    lines = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
    own = [(file, line, function) for file, line, function in lines if is_users(file)]
    last = text.strip().splitlines()[-1]
    if not own:
        return f"a DataLoader worker raised {last}"
    file, line, function = own[-1]
    return f"{function} raised in a DataLoader worker ({Path(file).name} line {line}): {last}"
