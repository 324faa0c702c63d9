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

import contextlib
import datetime
import inspect
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed

from config import ConfigError, to_dict


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
        fabric.save(tmp, state)
        if fabric.is_global_zero:
            fsync_tree(tmp)  # a folder's shards are complete here: torch's save ends in a collective
    except OSError as exc:  # disk full, permissions, ...
        error = exc
    failed = (
        fabric.world_size > 1
        and fabric.all_reduce(torch.tensor(float(error is not None), device=fabric.device), reduce_op="max").item()
    )
    if error is not None or failed:
        raise SystemExit(
            f"error: cannot write checkpoint {path} ({error or 'failed on another rank'}); the run stops "
            f"here, the checkpoints already in {path.parent} are intact"
        )
    if fabric.is_global_zero:
        replace(tmp, path)
    fabric.barrier()


def save_ranked(run, score: float, mode: str) -> None:
    """At a validation: write step-N.ckpt, keep the best k by the monitored metric, point last.ckpt at it."""
    ckpt = run.cfg.checkpoint
    path = run.run_dir / "checkpoints" / f"step-{run.step:08d}.ckpt"
    run.best.append((score, path.name))
    run.best.sort(key=lambda item: item[0], reverse=mode == "max")
    dropped = run.best[ckpt.keep_best :] if ckpt.keep_best > 0 else []
    del run.best[len(run.best) - len(dropped) :]
    save(run, path)
    link_last(run, path)
    if run.fabric.is_global_zero:
        for _, name in dropped:
            remove(run.run_dir / "checkpoints" / name)
        if run.loggers is not None and run.cfg.log.checkpoint_artifacts:
            aliases = ["last", f"step-{run.step}"] + (["best"] if run.best[0][1] == path.name else [])
            # from last.ckpt (the same file): `path` itself is gone if it did not make the best k
            run.loggers.log_checkpoint(path.parent / "last.ckpt", path.name, aliases, [name for _, name in dropped])


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


def link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def replace(tmp: Path, path: Path) -> None:
    """os.replace, also where a folder is involved: the old one moves aside to `<name>.old` (which
    `resume_candidates` still offers, should a crash come before the new one is in place)."""
    if path.is_dir() or (tmp.is_dir() and path.exists()):
        old = path.with_name(path.name + ".old")
        remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        fsync(path.parent)
        remove(old)
    else:
        os.replace(tmp, path)
    fsync(path.parent)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for item in [*path.rglob("*"), path] if path.is_dir() else [path]:
        fsync(item)


def resume_candidates(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, the one to try first first: last.ckpt, then step checkpoints newest first."""
    folder = run_dir / "checkpoints"
    lasts = [folder / name for name in ("last.ckpt", "last.ckpt.old") if (folder / name).exists()]
    return lasts + sorted(folder.glob("step-*.ckpt"), reverse=True)


def newest_run(out_dir: Path) -> Path | None:
    """The run folder under `out_dir` whose newest checkpoint is the most recent (for `--resume auto`)."""
    checkpoints = [p for p in out_dir.glob("*/checkpoints/*.ckpt")]
    return max(checkpoints, key=os.path.getmtime).parent.parent if checkpoints else None


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
        except Exception as exc:  # a truncated or foreign file
            return None, None, f"resume: {resume_from}: cannot load checkpoint ({type(exc).__name__}: {exc})"
        new_name = f"{cfg.task}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        if cfg.run_name:
            run_dir = cfg.out_dir / cfg.run_name
        elif resume_from and not from_artifact and resume_from.resolve().parent.name == "checkpoints":
            run_dir = resume_from.resolve().parent.parent  # <run>/checkpoints/<checkpoint>
        elif resume_from:  # an artifact or a loose checkpoint: the run it records, under out_dir
            run_dir = cfg.out_dir / (recorded.get("name") or new_name)
        elif cfg.resume == "auto" and (latest := newest_run(cfg.out_dir)):
            run_dir = latest
        else:
            run_dir = cfg.out_dir / new_name
        if recorded.get("wandb_id") and not (run_dir / "wandb_id.txt").exists():  # continue its wandb run
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "wandb_id.txt").write_text(recorded["wandb_id"])
        return str(run_dir), resume_from and str(resume_from), None

    run_dir, resume_from, error = fabric.broadcast(decide() if fabric.is_global_zero else None, 0)
    if error:
        raise ConfigError(error)
    return Path(run_dir), resume_from and Path(resume_from)


def restore(run, path: Path | None) -> None:
    """Load model, optimizer, counters and RNG states. With `--resume auto`, try the run's
    checkpoints newest first and skip any that fails to load, naming it."""
    candidates = [path] if path else resume_candidates(run.run_dir)
    for candidate in candidates:
        try:
            rest = load(run.fabric, candidate, {"model": run.model, "optimizer": run.optimizer})
        except Exception as exc:  # a truncated or foreign file: fall back to the previous one
            if path:
                raise SystemExit(f"error: {candidate}: cannot load checkpoint ({type(exc).__name__}: {exc})") from None
            run.fabric.print(
                f"warning: {candidate}: cannot load checkpoint ({type(exc).__name__}); trying an older one"
            )
            continue
        for key, value in rest["progress"].items():
            setattr(run, key, value.to(run.fabric.device) if torch.is_tensor(value) else value)
        restore_rng(rest["rng"], run.fabric.global_rank)
        if rest.get("precision"):  # empty unless fp16 (a scaler refuses an empty state)
            run.fabric.strategy.precision.load_state_dict(rest["precision"])
        # from an artifact or a copied file, the run's other checkpoints may not be here: rank only those that are
        run.best = [(score, name) for score, name in run.best if (run.run_dir / "checkpoints" / name).exists()]
        run.fabric.print(f"resumed from {candidate} at step {run.step} (epoch {run.epoch})")
        return
    if candidates:
        raise SystemExit(f"error: {run.run_dir}: no loadable checkpoint among {', '.join(map(str, candidates))}")
    run.fabric.print(f"resume auto: no checkpoint in {run.run_dir}; starting a new run")


def is_sharding(fabric) -> bool:
    from lightning_fabric.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(fabric.strategy, (FSDPStrategy, ModelParallelStrategy))


def load(fabric, path: Path, state: dict, strict: bool = True) -> dict:
    """Load `state` ({name: module or optimizer}) from a checkpoint file or folder; return the rest.

    Under FSDP/FSDP2 Fabric loads (a whole file into the shards, a folder resharded to any number of
    processes), from the CPU. Otherwise the file is memory-mapped onto the CPU and each tensor copied to
    its parameter: Fabric's own load would put every rank's copy on the GPU the checkpoint was saved
    from (cuda:0), and a folder is read whole from its shards."""
    if is_sharding(fabric):
        with ordinary_errors():
            return fabric.load(path, state, strict=strict, weights_only=False)
    if Path(path).is_dir():
        return load_folder(Path(path), state, strict)
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    for key, obj in state.items():
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict(checkpoint.pop(key), strict=strict)
        else:  # an optimizer moves its state to its parameters' device
            obj.load_state_dict(checkpoint.pop(key))
    return checkpoint


def load_folder(path: Path, state: dict, strict: bool = True) -> dict:
    """A folder of shards into whole modules and optimizers (Fabric's wrappers or plain ones): torch's
    distributed checkpoint reads every tensor from whichever shards hold its pieces."""
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


@contextlib.contextmanager
def ordinary_errors():
    """torch's distributed checkpoint fails with a BaseException, which `except Exception` (the fallback
    to an older checkpoint, the one-line error) would not catch: re-raise its first rank's cause."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        failure = next(iter(exc.failures.values()), None)
        cause = failure[0] if isinstance(failure, tuple) else failure
        raise RuntimeError(f"{type(cause).__name__}: {cause}") from None


def read_metadata(path: Path) -> dict:
    """A checkpoint without its model and optimizer: config, progress, RNG states, run identity
    (a file is memory-mapped, so its tensors are not read)."""
    path = Path(path)
    if path.is_dir():
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


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
    """Every rank's RNG states (python, numpy, torch, cuda), gathered so rank 0 can save them all."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if fabric.world_size == 1:
        return [state]
    gathered = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def restore_rng(states: list[dict], rank: int) -> None:
    state = states[rank % len(states)]  # a changed world size reuses states; resume then is not bitwise
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
