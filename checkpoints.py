"""Checkpoints: writing them so that a crash never damages the last good one, finding the one to
resume from, loading one into any strategy, and the RNG states they carry.

A checkpoint is `<run>/checkpoints/step-N.ckpt` (and `last.ckpt`, the same content) in one of two forms:
- a file (torch.save, written by rank 0; under FSDP the state is gathered to it first);
- with `checkpoint.sharded` under FSDP or FSDP2, a folder in which every rank wrote its own shard
  (torch.distributed.checkpoint) beside `meta.pt` with the rest: no host ever holds the whole model.
Both are written under a temporary name, fsynced and renamed into place. A folder loads into any
number of FSDP/FSDP2 processes (torch reshards it) and into one process without FSDP.

A source for `--resume` / `--init-from` may also be a wandb model artifact (see `resolve_source`).
"""

import datetime
import inspect
import json
import math
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed
from lightning_fabric.wrappers import _unwrap_objects

import data
import distributed
from config import ConfigError, is_plain_name
from configfile import to_dict
from storage import (
    CHECKSUMS,
    dcp_metadata,
    folder_checksums,
    fsync_tree,
    link_or_copy,
    ordinary_errors,
    remove,
    replace,
    require_data_only,
    torch_file,
    verify,
)


def nonfinite_weights(run) -> torch.Tensor:
    """Per parameter (this rank's shard of it under FSDP): does it hold an inf or NaN? On the device. Not a norm:
    the norm of large finite weights overflows."""
    weights = [p.detach() for p in run.params]
    if run.sharded:
        weights = [w.to_local() for w in weights]
    return torch.stack([~torch.isfinite(w).all() for w in weights])


def save(run, path: Path) -> None:
    """Write `path` atomically, every rank taking part. A write error on any rank stops every rank
    (or the others would hang) with the previous checkpoints intact. Under `--monitor.on-nonfinite skip`
    non-finite weights are never written: the run stops instead, the last checkpoint being the last good one."""
    fabric = run.fabric
    if run.cfg.monitor.on_nonfinite == "skip":
        bad = nonfinite_weights(run).float()
        if fabric.world_size > 1:
            bad = fabric.all_reduce(bad, reduce_op="max")
        if bad.any().item():
            name = run.param_names[int(bad.argmax())]
            raise SystemExit(
                f"error: step {run.step}: {name} is not finite (is the learning rate too large?); not saved to "
                f"{path.name}: the last checkpoint holds the last finite weights"
            )
    state = {
        "model": run.model,
        "optimizer": run.optimizer,
        "progress": run.progress(),
        "rng": rng_states(fabric),
        "data": loader_states(fabric, run.train_loader),
        "config": to_dict(run.cfg),
        "run": run_identity(run.run_dir),
        "task": {"name": run.task.name, "file": str(Path(inspect.getsourcefile(run.task.build_model)).resolve())},
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
            require_data_only(tmp)  # what the safe loader would refuse is a bug here, not a file to find later
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
    """At a validation: write step-N.ckpt, keep the best k by the monitored metric, point last.ckpt at it."""
    ckpt = run.cfg.checkpoint
    path = run.run_dir / "checkpoints" / f"step-{run.step:08d}.ckpt"
    run.best.append((score, path.name))
    run.best.sort(key=lambda item: rank_key(item[0], mode))
    dropped = run.best[ckpt.keep_best :] if ckpt.keep_best > 0 else []
    del run.best[len(run.best) - len(dropped) :]
    save(run, path)
    link_last(run, path)
    if run.fabric.is_global_zero:
        for _, name in dropped:
            remove(run.run_dir / "checkpoints" / name)
        if run.loggers is not None and run.cfg.log.checkpoint_artifacts:
            best = run.best[0][1] == path.name and math.isfinite(score)
            aliases = ["last", f"step-{run.step}"] + (["best"] if best else [])
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


def resume_candidates(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, the one to try first first: last.ckpt, then step checkpoints newest first."""
    folder = run_dir / "checkpoints"
    lasts = [folder / name for name in ("last.ckpt", "last.ckpt.old") if (folder / name).exists()]
    return lasts + sorted(folder.glob("step-*.ckpt"), reverse=True)


def newest_run(out_dir: Path, task: str) -> Path | None:
    """The run folder of `task` under `out_dir` whose newest checkpoint is the most recent (for `--resume auto`)."""
    checkpoints = [p for p in out_dir.glob("*/checkpoints/*.ckpt") if run_task(p.parent.parent) == task]
    return max(checkpoints, key=os.path.getmtime).parent.parent if checkpoints else None


def run_task(run_dir: Path) -> str | None:
    """The task a run folder's config.json names (None if it cannot be read)."""
    try:
        return json.loads((run_dir / "config.json").read_text()).get("task")
    except (OSError, ValueError, AttributeError):
        return None


def new_run_dir(out_dir: Path, name: str) -> Path:
    """A run folder of that name that did not exist, made now (name-2, name-3, ... if it did): two runs started in
    the same second get two folders."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = out_dir / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"out_dir: {out_dir} already holds {name} and 999 more of that name")


def choose_run_dir(fabric, cfg) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None for a fresh start). Rank 0 decides
    (fetching an artifact if one is named) and broadcasts, so every rank agrees even if clocks
    differ; an error on rank 0 is raised on every rank."""

    def decide() -> tuple[str | None, str | None, str | None]:
        resume_from = None
        if cfg.resume and cfg.resume != "auto":
            try:
                resume_from, from_artifact = resolve_source(cfg.resume, cfg.out_dir)
            except ConfigError as exc:
                return None, None, f"resume: {exc}"
        try:
            recorded = read_metadata(resume_from).get("run", {}) if resume_from else {}
        except Exception as exc:  # a truncated, foreign or unsafe file
            return None, None, f"resume: {resume_from}: cannot load checkpoint ({reason(exc)})"
        # names read from a file are data: one plain folder name under out_dir, never a path
        for key in ("name", "wandb_id"):
            if recorded.get(key) is not None and not is_plain_name(recorded[key]):
                return (
                    None,
                    None,
                    (
                        f"resume: {resume_from} records the run {key} {recorded[key]!r}, which is not one plain folder "
                        "name; give --run-name NAME"
                    ),
                )
        new_name = f"{cfg.task}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        if cfg.run_name:
            run_dir = cfg.out_dir / cfg.run_name
        elif resume_from and not from_artifact and resume_from.resolve().parent.name == "checkpoints":
            run_dir = resume_from.resolve().parent.parent  # <run>/checkpoints/<checkpoint>
        elif resume_from and recorded.get("name"):  # an artifact or a loose checkpoint: the run it records
            run_dir = cfg.out_dir / recorded["name"]
        elif cfg.resume == "auto" and (latest := newest_run(cfg.out_dir, cfg.task)):
            run_dir = latest
        else:
            try:
                run_dir = new_run_dir(cfg.out_dir, new_name)
            except OSError as exc:
                return None, None, f"out_dir: cannot make a run folder in {cfg.out_dir} ({exc})"
        if cfg.resume and (found := run_task(run_dir)) not in (None, cfg.task):
            return None, None, f"resume: {run_dir} is a run of the {found!r} task, not of {cfg.task!r}"
        if recorded.get("wandb_id") and not (run_dir / "wandb_id.txt").exists():  # continue its wandb run
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "wandb_id.txt").write_text(recorded["wandb_id"])
        return str(run_dir), resume_from and str(resume_from), None

    run_dir, resume_from, error = fabric.broadcast(decide() if fabric.is_global_zero else None, 0)
    if error:
        raise ConfigError(error)
    return Path(run_dir), resume_from and Path(resume_from)


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
            verify(candidate)
            rest = load(run.fabric, candidate, {"model": run.model, "optimizer": run.optimizer})
        except Exception as exc:  # a truncated, foreign or unsafe file: fall back to the previous one
            if path:
                raise SystemExit(f"error: {candidate}: cannot load checkpoint ({reason(exc)})") from None
            run.fabric.print(f"warning: {candidate}: cannot load checkpoint ({reason(exc)}); trying an older one")
            continue
        for key, value in rest["progress"].items():
            setattr(run, key, value.to(run.fabric.device) if torch.is_tensor(value) else value)
        restore_rng(rest["rng"], run.fabric.global_rank)
        if rest.get("data") is not None:  # a stream's position, this rank's
            run.train_loader.load_state_dict(rest["data"][run.fabric.global_rank % len(rest["data"])])
        if rest.get("precision"):  # empty unless fp16 (a scaler refuses an empty state)
            run.fabric.strategy.precision.load_state_dict(rest["precision"])
        # from an artifact or a copied file, the run's other checkpoints may not be here: rank only those that are
        run.best = [(score, name) for score, name in run.best if (run.run_dir / "checkpoints" / name).exists()]
        run.fabric.print(f"resumed from {candidate} at step {run.step} (epoch {run.epoch})")
        return True
    if candidates:
        raise SystemExit(f"error: {run.run_dir}: no loadable checkpoint among {', '.join(map(str, candidates))}")
    run.fabric.print(f"resume auto: no checkpoint in {run.run_dir}; starting a new run")
    return False


def init_weights(run, source: str) -> None:
    """`--init-from`: the tensors of a checkpoint (kibitz's, a file or a folder, or a plain state_dict file) whose
    names and shapes the model shares, the rest of the model as initialised. A source that fits nothing is an
    error (another task's checkpoint, say), not a silent no-op."""
    path = resolve_source(source, run.cfg.out_dir)[0]
    with torch.device("meta"):  # names and shapes as the model's own state_dict has them, whatever the strategy
        expected = {k: v.shape for k, v in run.task.build_model(run.cfg).state_dict().items()}
    try:
        found = saved_shapes(path)
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
        if is_sharding(run.fabric):
            with ordinary_errors():
                run.fabric.load(path, {"model": run.model}, strict=False, weights_only=True)
        else:
            module = getattr(run.model, "_original_module", run.model)
            getattr(module, "_orig_mod", module).load_state_dict(whole_state(path, fitting), strict=False)  # compiled
    except Exception as exc:  # a damaged shard: its names and shapes read, its tensors not
        raise ConfigError(f"init_from: {path}: cannot be loaded ({reason(exc)})") from None
    skipped = f"; {len(other_shape)} of another shape kept as initialised: {', '.join(other_shape[:3])}"
    run.fabric.print(
        f"initialised {len(fitting)} of the model's {len(expected)} tensors from {source}"
        + (skipped if other_shape else "")
    )


def saved_shapes(path: Path) -> dict[str, torch.Size] | None:
    """{name: shape} of the model tensors a checkpoint holds (None: it holds none), without reading them."""
    if path.is_dir():
        require_data_only(path)
        metadata = dcp_metadata(path).state_dict_metadata
        return {
            k[len("model.") :]: v.size for k, v in metadata.items() if k.startswith("model.") and hasattr(v, "size")
        }
    checkpoint = torch_file(path)
    weights = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(v) for v in weights.values()):
        return None
    return {k: v.shape for k, v in weights.items()}


def whole_state(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named model tensors of a checkpoint file or folder, whole, on the CPU."""
    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        shapes = saved_shapes(path)
        wanted = {"model": {k: torch.empty(shapes[k]) for k in names}}
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        with ordinary_errors():
            dcp.load(wanted, checkpoint_id=path)
        return wanted["model"]
    checkpoint = torch_file(path)
    weights = checkpoint.get("model", checkpoint)
    return {k: weights[k] for k in names}


def reason(exc: Exception) -> str:
    """An exception as a short clause for a one-line message (torch's size mismatches run to many lines)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:600]}{'...' if len(text) > 600 else ''}"


def is_sharding(fabric) -> bool:
    from lightning_fabric.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(fabric.strategy, (FSDPStrategy, ModelParallelStrategy))


def load(fabric, path: Path, state: dict, strict: bool = True) -> dict:
    """Load `state` ({name: module or optimizer}) from a checkpoint file or folder; return the rest.

    Under FSDP/FSDP2 Fabric loads (a whole file into the shards, a folder resharded to any number of
    processes), from the CPU. Otherwise the file is memory-mapped onto the CPU and each tensor copied to
    its parameter, read only as it is copied: Fabric's own load reads every rank's whole copy into memory
    first. A folder is read whole from its shards."""
    require_data_only(path)  # Fabric's loads below unpickle without restriction: only data reaches them
    if is_sharding(fabric):
        with ordinary_errors():
            return fabric.load(path, state, strict=strict, weights_only=True)
    if Path(path).is_dir():
        return load_folder(Path(path), state, strict)
    checkpoint = torch_file(path)
    missing = [key for key in [*state, "progress"] if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"not a kibitz checkpoint: no {', '.join(missing)} entry")
    for key, obj in state.items():
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict(checkpoint.pop(key), strict=strict)
        else:  # an optimizer moves its state to its parameters' device
            obj.load_state_dict(checkpoint.pop(key))
    return checkpoint


def load_folder(path: Path, state: dict, strict: bool = True) -> dict:
    """A folder of shards into whole modules and optimizers (Fabric's wrappers or plain ones): torch's
    distributed checkpoint reads every tensor from whichever shards hold its pieces."""
    require_data_only(path)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    unwrap = {
        key: getattr(obj, "module", None) if hasattr(obj, "_forward_module") else getattr(obj, "optimizer", obj)
        for key, obj in state.items()
    }
    model = next(obj for obj in unwrap.values() if isinstance(obj, torch.nn.Module))
    # torch warns that it reads without a process group: that is the point here
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    for key, obj in unwrap.items():
        if isinstance(obj, torch.nn.Module):
            wanted = {key: get_model_state_dict(obj)}
            with ordinary_errors():
                dcp.load(wanted, checkpoint_id=path)
            obj.load_state_dict(wanted[key], strict=strict)
        else:  # the optimizer's state is saved by parameter name
            wanted = {key: get_optimizer_state_dict(model, obj)}
            with ordinary_errors():
                dcp.load(wanted, checkpoint_id=path)
            set_optimizer_state_dict(model, obj, optim_state_dict=wanted[key])
    return read_metadata(path)


def read_metadata(path: Path) -> dict:
    """A checkpoint without its model and optimizer: config, progress, RNG states, run identity
    (a file is memory-mapped, so its tensors are not read)."""
    path = Path(path)
    if path.is_dir():
        return torch_file(path / "meta.pt")
    return torch_file(path)


# ---------------------------------------------------------------- wandb model artifacts


def resolve_source(source: str, out_dir: Path) -> tuple[Path, bool]:
    """The checkpoint a `--resume` / `--init-from` value names, and whether it is an artifact.

    - a path: a checkpoint file or folder, or an artifact folder (one holding `model.ckpt`, as
      `wandb artifact get` or `Artifact.download()` leave it);
    - `wandb:NAME[:ALIAS]` (ALIAS: latest, last, best, step-N, vK; default latest): the model
      artifact a run logged with `log.checkpoint_artifacts`. Offline it is found in the run folders
      under `out_dir` (wandb keeps the staged files until `wandb sync`); otherwise it is downloaded
      with the wandb API. Either way it lands in `out_dir/artifacts/NAME-ALIAS/`.
    """
    if source.startswith("wandb:"):
        name, _, alias = source[len("wandb:") :].partition(":")
        folder = out_dir / "artifacts" / f"{name}-{alias or 'latest'}"
        if not (folder / "model.ckpt").exists():
            fetch_artifact(name, alias or "latest", out_dir, folder)
        return folder / "model.ckpt", True
    path = Path(source)
    if path.is_dir() and (path / "model.ckpt").exists():
        return path / "model.ckpt", True
    if not path.exists():
        raise ConfigError(f"{source}: no such checkpoint file or folder")
    return path, False


def fetch_artifact(name: str, alias: str, out_dir: Path, folder: Path) -> None:
    entries = offline_artifact(name, alias, out_dir)
    tmp = folder.with_name(folder.name + ".tmp")
    remove(tmp)
    if entries is not None:
        for relative, local in entries.items():
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(local, tmp / relative)
    else:
        try:
            import wandb

            wandb.Api().artifact(f"{name}:{alias}", type="model").download(root=str(tmp))
        except Exception as exc:
            raise ConfigError(
                f"wandb:{name}:{alias}: not found offline in the runs under {out_dir}, "
                f"and the wandb API could not fetch it ({type(exc).__name__}: {exc})"
            ) from None
    if not (tmp / "model.ckpt").exists():
        raise ConfigError(f"wandb:{name}:{alias}: the artifact holds no model.ckpt")
    remove(folder)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)


def offline_artifact(name: str, alias: str, out_dir: Path) -> dict[str, str] | None:
    """{path in the artifact: staged local file} of the newest version of artifact `name` that carries
    `alias` (or is version vK), as logged by the offline wandb runs under `out_dir`; None if none is."""
    from loggers import wandb_records, wandb_segments

    versions = [
        r["artifact"]
        for log in wandb_segments(list(out_dir.glob("*/wandb")))
        for r in wandb_records(log)
        if r["type"] == "artifact" and r["artifact"]["name"] == name
    ]  # in logging order: vK is the K-th
    chosen = [a for k, a in enumerate(versions) if alias in a.get("aliases", []) or alias == f"v{k}"]
    if not chosen:
        return None
    entries = {e["path"]: e["local_path"] for e in chosen[-1]["manifest"]["contents"]}
    missing = [p for p in entries.values() if not Path(p).exists()]
    return None if missing else entries  # synced (staging cleaned): the API has it


# ---------------------------------------------------------------- RNG states


def rng_states(fabric) -> list[dict]:
    """Every rank's RNG states (python, numpy, torch, cuda) as tensors, numbers and lists (what the safe loader
    reads), gathered so rank 0 can save them all."""
    version, words, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if fabric.world_size == 1:
        return [state]
    gathered = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def loader_states(fabric, loader) -> list | None:
    """Every rank's position in its stream (torchdata's state_dict: plain data), gathered so rank 0 can save them all;
    None for epoch-ordered data, whose position the step counters give."""
    if not hasattr(loader, "state_dict"):
        return None
    if fabric.world_size == 1:
        return [loader.state_dict()]
    gathered = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, loader.state_dict())
    return gathered


def restore_rng(states: list[dict], rank: int) -> None:
    state = states[rank % len(states)]  # a changed world size reuses states; resume then is not bitwise
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
