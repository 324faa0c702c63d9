"""Checkpoints: writing them so that a crash never damages the last good one, finding the one to
resume from, loading one into any strategy, and the RNG states they carry.

A checkpoint is `<run>/checkpoints/step-N.ckpt` (and `last.ckpt`, the same content) in one of two forms:
- a file (torch.save, written by rank 0; under FSDP the state is gathered to it first);
- with `checkpoint.sharded` under FSDP or FSDP2, a folder in which every rank wrote its own shard
  (torch.distributed.checkpoint) beside `meta.pt` with the rest: no host ever holds the whole model.
Both are written under a temporary name, fsynced and renamed into place. A folder loads into any
number of FSDP/FSDP2 processes (torch reshards it) and into one process without FSDP.

What a checkpoint holds is data only (tensors, numbers, strings, lists, dicts): `Progress` is the loop's place.
"""

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import torch
import torch.distributed
from lightning_fabric.wrappers import _unwrap_objects

import data
from config import ConfigError
from kibitz import distributed
from kibitz.configfile import code_version, to_dict
from kibitz.contract import task_file
from kibitz.distributed import local
from kibitz.storage import (
    CHECKSUMS,
    folder_checksums,
    fsync_tree,
    link_or_copy,
    load_shards,
    ordinary_errors,
    remove,
    replace,
    torch_file,
    verify,
)

STEP_CHECKPOINT = re.compile(r"step-\d+\.ckpt")  # the one form of a ranked checkpoint's name


@dataclasses.dataclass
class Progress:
    """Where the loop is: what a checkpoint saves and a resume restores (with the log window's sums)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps taken in the current epoch: the position inside it
    best: list = dataclasses.field(default_factory=list)  # [(score, checkpoint file name)], best first
    early_stop_best: float | None = None
    bad_validations: int = 0  # validations in a row without an improvement


def nonfinite_weights(run) -> torch.Tensor:
    """Per parameter (this rank's shard of it under FSDP): does it hold an inf or NaN? On the device. Not a norm:
    the norm of large finite weights overflows."""
    weights = [local(p.detach()) for p in run.params]
    return torch.stack([~torch.isfinite(w).all() for w in weights])


def save(run, path: Path) -> None:
    """Write `path` atomically, every rank taking part. A write error on any rank stops every rank
    (or the others would hang) with the previous checkpoints intact. Under `--monitor.on-nonfinite skip`
    non-finite weights are never written: the run stops instead, the last checkpoint being the last good one."""
    fabric = run.fabric
    if run.cfg.monitor.on_nonfinite == "skip":
        bad = nonfinite_weights(run).float()
        if fabric.world_size > 1:  # a rank's shard, or a rank's own update: every rank must know
            bad = fabric.all_reduce(bad, reduce_op="max")
        if bad.any().item():
            name = run.param_names[int(bad.argmax())]
            raise SystemExit(
                f"error: step {run.progress.step}: {name} is not finite (is the learning rate too large?); not saved "
                f"to {path.name}: the last checkpoint holds the last finite weights"
            )
    state = {
        "model": run.model,
        "optimizer": run.optimizer,
        "progress": dataclasses.asdict(run.progress),
        "window": {"sums": run.window.sums.clone(), "steps": run.window.steps},  # a log interval cut by the save
        "rng": distributed.rng_states(fabric),
        "data": distributed.loader_states(fabric, run.train_loader),
        "config": to_dict(run.cfg),
        "code": code_version(),  # the git commit and whether the tree had changed
        "run": run_identity(run.run_dir),
        "task": {"name": run.task.name, "file": str(task_file(run.task))},
        "precision": fabric.strategy.precision.state_dict(),
    }  # fp16: the GradScaler's scale and growth
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    error = None
    try:
        if run.cfg.checkpoint.sharded:  # a folder left by a crash must not mix its shards into this one
            if fabric.is_global_zero:
                remove(tmp)
            fabric.barrier()
        # The strategy's save without Fabric's barrier after it: rank 0 failing alone would leave the other
        # ranks in that barrier and itself in stop_together's all-reduce, forever. That all-reduce is the barrier.
        with ordinary_errors():
            fabric.strategy.save_checkpoint(path=tmp, state=_unwrap_objects(state))
        if fabric.is_global_zero:
            if tmp.is_dir():  # a file carries CRC-32s already (a zip archive); a folder's go beside its shards
                (tmp / CHECKSUMS).write_text(json.dumps(folder_checksums(tmp), indent=1))
            fsync_tree(tmp)  # a folder's shards are complete here: torch's save ends in a collective
            verify(tmp, crc=False)  # what the safe loader would refuse is a bug here, not a file to find later
    except (OSError, RuntimeError, ValueError) as exc:  # disk full, permissions (RuntimeError: torch's sharded save)
        error = (
            f"error: cannot write checkpoint {path} ({exc}); the run stops here, the checkpoints already in "
            f"{path.parent} are intact"
        )
    distributed.stop_together(fabric, error)
    if fabric.is_global_zero:
        replace(tmp, path)
    fabric.barrier()


def save_ranked(run, score: float, mode: str) -> None:
    """At a validation: write step-N.ckpt, keep the best k by the ranking metric, point last.ckpt at it."""
    ckpt = run.cfg.checkpoint
    best = run.progress.best
    path = run.run_dir / "checkpoints" / f"step-{run.progress.step:08d}.ckpt"
    best.append((score, path.name))
    best.sort(key=lambda item: rank_key(item[0], mode))
    dropped = best[ckpt.keep_best :] if ckpt.keep_best > 0 else []
    del best[len(best) - len(dropped) :]
    save(run, path)
    link_last(run, path)
    if run.fabric.is_global_zero:
        for _, name in dropped:
            remove(run.run_dir / "checkpoints" / name)
        if run.loggers is not None and run.cfg.log.checkpoint_artifacts:
            is_best = best[0][1] == path.name and math.isfinite(score)
            aliases = ["last", f"step-{run.progress.step}"] + (["best"] if is_best else [])
            # from last.ckpt (the same file): `path` itself is gone if it did not make the best k
            run.loggers.log_checkpoint(path.parent / "last.ckpt", path.name, aliases, [name for _, name in dropped])


def rank_key(score: float, mode: str) -> tuple[bool, float]:
    """Best first by the direction; a non-finite score (a NaN metric) is never best, whatever the direction."""
    finite = math.isfinite(score)
    return not finite, (score if mode == "min" else -score) if finite else 0.0


def best_finite(best: list) -> tuple[float, str] | None:
    """The best ranked checkpoint whose score is finite (None: no validation gave a finite score)."""
    return best[0] if best and math.isfinite(best[0][0]) else None


def run_identity(run_dir: Path) -> dict:
    """What a checkpoint needs to continue its run from anywhere (say, downloaded as an artifact)."""
    id_file = run_dir / "wandb_id.txt"
    return {"name": run_dir.name, "wandb_id": id_file.read_text().strip() if id_file.exists() else None}


def resume_candidates(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, the one to try first first: last.ckpt, then step checkpoints newest first."""
    folder = run_dir / "checkpoints"
    lasts = [folder / name for name in ("last.ckpt", "last.ckpt.old") if (folder / name).exists()]
    return lasts + sorted(folder.glob("step-*.ckpt"), reverse=True)


def link_last(run, path: Path) -> None:
    """Make last.ckpt the same content as `path`: hard links (copies where links are not supported),
    swapped in atomically."""
    if not run.fabric.is_global_zero:
        return
    last, tmp = path.parent / "last.ckpt", path.parent / "last.ckpt.tmp"
    remove(tmp)
    if path.is_dir():
        shutil.copytree(path, tmp, copy_function=link_or_copy)
    else:
        link_or_copy(path, tmp)
    replace(tmp, last)


def restore(run, path: Path | None) -> bool:
    """Load model, optimizer, counters and RNG states. With `--resume auto`, try the run's
    checkpoints newest first and skip any that fails to load, naming it. False: nothing to resume."""
    candidates = [path] if path else resume_candidates(run.run_dir)
    train = run.datasets.get("train")
    if candidates and data.is_stream(train) and not hasattr(train, "state_dict"):
        raise SystemExit(
            f"error: resume: the training stream ({type(train).__name__}) has no state_dict/load_state_dict, so a "
            "resumed run cannot continue where the checkpoint was taken (it would read the stream again from its "
            "start); give the dataset those two methods, or start a new run"
        )
    for candidate in candidates:
        try:
            rest = load(run.fabric, candidate, {"model": run.model, "optimizer": run.optimizer})
            restore_loop(run, rest)
        except Exception as exc:  # a truncated, foreign or unsafe file: fall back to the previous one
            if path:
                raise SystemExit(f"error: {candidate}: cannot load checkpoint ({reason(exc)})") from None
            run.fabric.print(f"warning: {candidate}: cannot load checkpoint ({reason(exc)}); trying an older one")
            continue
        run.fabric.print(f"resumed from {candidate} at step {run.progress.step} (epoch {run.progress.epoch})")
        return True
    if candidates:
        raise SystemExit(f"error: {run.run_dir}: no loadable checkpoint among {', '.join(map(str, candidates))}")
    run.fabric.print(f"resume auto: no checkpoint in {run.run_dir}; starting a new run")
    return False


def restore_loop(run, rest: dict) -> None:
    """The loop's place from a loaded checkpoint's rest, every field checked before any is used."""
    require(isinstance(rest, dict) and isinstance(rest.get("progress"), dict), "progress", "the loop's counters")
    saved = dict(rest["progress"])
    # before 2026-12-06 the log window's sums were saved inside progress
    window = rest.get("window") or {"sums": saved.pop("loss_sum", None), "steps": saved.pop("steps_since_log", None)}
    check_loop_state(saved, window, rest, run)
    run.progress = Progress(**saved)
    run.progress.best = [(float(score), name) for score, name in run.progress.best]
    run.window.sums = window["sums"].to(run.fabric.device)
    run.window.steps = window["steps"]
    distributed.restore_rng(rest["rng"], run.fabric.global_rank)
    if rest.get("data") is not None:  # a stream's position, this rank's
        run.train_loader.load_state_dict(rest["data"][run.fabric.global_rank % len(rest["data"])])
    if rest.get("precision"):  # empty unless fp16 (a scaler refuses an empty state)
        run.fabric.strategy.precision.load_state_dict(rest["precision"])
    # from an artifact or a copied file, the run's other checkpoints may not be here: rank only those that are
    kept = run.run_dir / "checkpoints"
    run.progress.best = [(score, name) for score, name in run.progress.best if (kept / name).exists()]


def check_loop_state(progress: dict, window: dict, rest: dict, run) -> None:
    """A checkpoint's counters, log window, RNG states and stream position, by type and range: a crafted or damaged
    field is one line naming it, and a ranked checkpoint's name is `step-N.ckpt` (a name, never a path)."""
    fields = {field.name for field in dataclasses.fields(Progress)}
    unknown = sorted(map(str, set(progress) - fields))
    require(not unknown, f"progress.{unknown[0] if unknown else ''}", "no such field (the loop's are step, epoch, ...)")
    for name in ("step", "epoch", "step_in_epoch", "bad_validations"):
        value = progress.get(name, 0)
        require(type(value) is int and value >= 0, f"progress.{name}", f"a count, got {value!r}")
    best = progress.get("best", [])
    require(isinstance(best, list) and all(map(is_ranked, best)), "progress.best", "[score, 'step-N.ckpt'] pairs")
    early = progress.get("early_stop_best")
    require(early is None or isinstance(early, (int, float)), "progress.early_stop_best", "a number or None")
    sums = window.get("sums") if isinstance(window, dict) else None
    shape = tuple(run.window.sums.shape)
    require(torch.is_tensor(sums) and tuple(sums.shape) == shape, "window.sums", f"a tensor of shape {shape}")
    require(type(window.get("steps")) is int and window["steps"] >= 0, "window.steps", "a count")
    check_rng(rest.get("rng"))
    streams = rest.get("data")
    if streams is not None:
        require(hasattr(run.train_loader, "load_state_dict"), "data", "none: this task's training data is no stream")
        require(isinstance(streams, list) and streams and all(isinstance(s, dict) for s in streams), "data", "states")


def is_ranked(entry) -> bool:
    """[score, name] with the name of a step checkpoint, as `save_ranked` records it."""
    return (
        isinstance(entry, (list, tuple))
        and len(entry) == 2
        and isinstance(entry[0], (int, float))
        and isinstance(entry[1], str)
        and STEP_CHECKPOINT.fullmatch(entry[1]) is not None
    )


def check_rng(states) -> None:
    """Every rank's RNG states as `rng_states` writes them."""
    require(isinstance(states, list) and states, "rng", "a list of every rank's RNG states")
    for state in states:
        state = state if isinstance(state, dict) else {}
        python, numpy, tensor = state.get("python"), state.get("numpy"), state.get("torch")
        require(is_words(python, 3, 625), "rng.python", "random's state as [version, 625 words, gauss]")
        require(is_words(numpy, 5, 624), "rng.numpy", "numpy's state as [kind, 624 keys, position, gauss, cached]")
        require(torch.is_tensor(tensor) and tensor.dtype == torch.uint8, "rng.torch", "torch's state (a byte tensor)")


def is_words(state, length: int, words: int) -> bool:
    """An RNG state saved as a list whose second item is its list of integer words."""
    return (
        isinstance(state, list)
        and len(state) == length
        and isinstance(state[1], list)
        and len(state[1]) == words
        and all(type(word) is int for word in state[1])
    )


def require(ok, field: str, expected: str) -> None:
    if not ok:
        raise ValueError(f"{field}: expected {expected}")


def init_weights(run, path: Path, source: str) -> None:
    """`--init-from`: the tensors of a checkpoint (kibitz's, a file or a folder, or a plain state_dict file) whose
    names and shapes the model shares, the rest of the model as initialised. A source that fits nothing is an
    error (another task's checkpoint, say), not a silent no-op."""
    with torch.device("meta"):  # names and shapes as the model's own state_dict has them, whatever the strategy
        expected = {k: v.shape for k, v in run.task.build_model(run.cfg).state_dict().items()}
    try:
        shards = verify(path)
        found = saved_shapes(path, shards)
    except Exception as exc:  # random bytes, a foreign pickle
        raise ConfigError(f"init_from: {path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from None
    if found is None:
        raise ConfigError(f"init_from: {path}: expected a kibitz checkpoint or a file of a state_dict of tensors")
    fitting = [k for k, shape in found.items() if expected.get(k) == shape]
    other_shape = [k for k in found if k in expected and expected[k] != found[k]]
    if not fitting:
        raise ConfigError(
            f"init_from: {path}: none of its {len(found)} tensors fits the model's {len(expected)} by name and shape"
            f" (a checkpoint of another task or model?)"
        )
    if other_shape and is_sharding(run.fabric):
        raise ConfigError(
            f"init_from: {path}: {', '.join(other_shape[:3])} have another shape (under FSDP every "
            f"tensor the model shares with the checkpoint must have the same shape)"
        )
    try:
        if shards is not None and is_sharding(run.fabric):
            load_folder(path, {"model": run.model}, shards, strict=False)
        elif is_sharding(run.fabric):
            with ordinary_errors():
                run.fabric.load(path, {"model": run.model}, strict=False, weights_only=True)
        else:
            module = distributed.unwrapped(run.model)
            weights = whole_state(path, fitting, shards)
            getattr(module, "_orig_mod", module).load_state_dict(weights, strict=False)  # a compiled model's own
    except Exception as exc:  # a damaged shard: its names and shapes read, its tensors not
        raise ConfigError(f"init_from: {path}: cannot be loaded ({reason(exc)})") from None
    skipped = f"; {len(other_shape)} of another shape kept as initialised: {', '.join(other_shape[:3])}"
    run.fabric.print(
        f"initialised {len(fitting)} of the model's {len(expected)} tensors from {source}"
        + (skipped if other_shape else "")
    )


def saved_shapes(path: Path, shards=None) -> dict[str, torch.Size] | None:
    """{name: shape} of the model tensors a checked checkpoint holds (None: it holds none), without reading them.
    `shards`: a folder's checked index."""
    if shards is not None:
        items = shards.state_dict_metadata.items()
        return {k[len("model.") :]: v.size for k, v in items if k.startswith("model.") and hasattr(v, "size")}
    checkpoint = torch_file(path, checked=True)
    weights = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(v) for v in weights.values()):
        return None
    return {k: v.shape for k, v in weights.items()}


def whole_state(path: Path, names: list[str], shards=None) -> dict[str, torch.Tensor]:
    """The named model tensors of a checked checkpoint file or folder, whole, on the CPU."""
    if shards is not None:
        shapes = saved_shapes(path, shards)
        wanted = {"model": {k: torch.empty(shapes[k]) for k in names}}
        load_shards(path, wanted, shards)
        return wanted["model"]
    weights = torch_file(path, checked=True)
    weights = weights.get("model", weights)
    return {k: weights[k] for k in names}


def reason(exc: Exception) -> str:
    """An exception as a short clause for a one-line message (torch's size mismatches run to many lines)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:600]}{'...' if len(text) > 600 else ''}"


def is_sharding(fabric) -> bool:
    from lightning_fabric.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(fabric.strategy, (FSDPStrategy, ModelParallelStrategy))


def load(fabric, path: Path, state: dict, strict: bool = True) -> dict:
    """Load `state` ({name: module or optimizer}) from a checkpoint file or folder, checked whole first; return the
    rest.

    A folder is read through kibitz's own reader into any strategy (resharded to any number of processes). A file
    under FSDP/FSDP2 is Fabric's load (weights only); otherwise it is memory-mapped onto the CPU and each tensor
    copied to its parameter, read only as it is copied: Fabric's own load reads every rank's whole copy first."""
    shards = verify(path)
    if shards is not None:
        return load_folder(Path(path), state, shards, strict)
    if is_sharding(fabric):
        with ordinary_errors():
            return fabric.load(path, state, strict=strict, weights_only=True)
    checkpoint = torch_file(path, checked=True)
    missing = [key for key in [*state, "progress"] if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"not a kibitz checkpoint: no {', '.join(missing)} entry")
    for key, obj in state.items():
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict(checkpoint.pop(key), strict=strict)
        else:  # an optimizer moves its state to its parameters' device
            obj.load_state_dict(checkpoint.pop(key))
    return checkpoint


def load_folder(path: Path, state: dict, shards, strict: bool = True) -> dict:
    """A checked folder of shards into modules and optimizers (Fabric's wrappers or plain ones, sharded by FSDP2 or
    whole): each rank reads its part of every tensor from whichever shards hold it. Returns meta.pt's contents."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    unwrapped = {
        key: distributed.unwrapped(obj) if isinstance(obj, torch.nn.Module) else getattr(obj, "optimizer", obj)
        for key, obj in state.items()
    }
    model = next(obj for obj in unwrapped.values() if isinstance(obj, torch.nn.Module))
    for key, obj in unwrapped.items():
        if isinstance(obj, torch.nn.Module):
            wanted = {key: get_model_state_dict(obj)}
            load_shards(path, wanted, shards, partial=not strict)
            obj.load_state_dict(wanted[key], strict=strict)
        else:  # the optimizer's state is saved by parameter name
            wanted = {key: get_optimizer_state_dict(model, obj)}
            load_shards(path, wanted, shards)
            set_optimizer_state_dict(model, obj, optim_state_dict=wanted[key])
    return read_metadata(path)


def read_metadata(path: Path) -> dict:
    """A checkpoint without its model and optimizer: config, progress, RNG states, run identity (a file is
    memory-mapped, so its tensors are not read), as data. A file's CRCs are left to the load that follows, which
    verifies every byte: reading them here too would read a resumed or evaluated file twice."""
    path = Path(path)
    if path.is_dir():
        meta = path / "meta.pt"
        if meta.is_symlink() or not meta.is_file():
            raise ValueError("no meta.pt (the run's config and progress) in the folder, or a link in its place")
        return torch_file(meta)
    return torch_file(path, crc=False)


def checked_metadata(path: Path, failure: str) -> dict:
    """read_metadata where a checkpoint comes from the user: a truncated, foreign or unsafe file is the one-line
    ConfigError `failure (why)`; a checkpoint that is not a dict reads as an empty one."""
    try:
        metadata = read_metadata(path)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{failure} ({reason(exc)})") from None
    return metadata if isinstance(metadata, dict) else {}
