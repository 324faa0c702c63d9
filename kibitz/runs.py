"""Run folders: naming a new one, finding the one to continue, the checkpoint a `--resume` / `--init-from` names
(a wandb model artifact too), and one writer per folder at a time. Rank 0 decides; every rank agrees."""

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import re
import socket
from pathlib import Path

from config import ConfigError, is_plain_name
from kibitz import configfile, distributed
from kibitz.checkpoints import checked_metadata
from kibitz.storage import link_or_copy, open_in_place, remove, write_atomic


def open_run_folder(fabric, cfg, fresh_name: str | None = None) -> tuple[Path, Path | None, object]:
    """The run folder (chosen, or new as `fresh_name`), the checkpoint to resume from, and rank 0's lock on the
    folder (None elsewhere). Every rank stops together if the folder is in use."""
    if fresh_name is None:
        run_dir, resume_from = choose_run_dir(fabric, cfg)
    else:  # a new folder, made by rank 0 (the ranks' clocks may disagree on a name with the time in it)
        made = str(new_run_dir(cfg.out_dir, fresh_name)) if fabric.is_global_zero else None
        run_dir, resume_from = Path(fabric.broadcast(made, 0)), None
    lock, error = None, None
    if fabric.is_global_zero:
        try:
            check_run_folder(run_dir)
            lock = lock_folder(run_dir)
        except ConfigError as exc:
            error = f"error: {exc}"
        except FolderBusy as exc:
            error = f"error: run_name: {exc}; choose another --run-name"
        except OSError as exc:
            error = f"error: out_dir: cannot use the run folder {run_dir} ({exc.strerror or exc})"
    distributed.stop_together(fabric, error)
    return run_dir, resume_from, lock


def write_run_folder(fabric, cfg, run_dir: Path) -> None:
    """Rank 0: the checkpoints folder (without the leftovers of a killed save) and config.json."""
    error = None
    if fabric.is_global_zero:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            for leftover in (run_dir / "checkpoints").glob("*.tmp"):  # of a save that was killed
                remove(leftover)
            configfile.save_json(
                dataclasses.replace(cfg, resume=None), run_dir / "config.json", configfile.code_version()
            )
        except OSError as exc:
            error = f"error: cannot write the run folder {run_dir} ({exc})"
    distributed.stop_together(fabric, error)


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
        try:
            run_dir, resume_from = decide_run_dir(cfg)
        except ConfigError as exc:
            return None, None, str(exc)
        return str(run_dir), resume_from and str(resume_from), None

    run_dir, resume_from, error = fabric.broadcast(decide() if fabric.is_global_zero else None, 0)
    if error:
        raise ConfigError(error)
    return Path(run_dir), resume_from and Path(resume_from)


def decide_run_dir(cfg) -> tuple[Path, Path | None]:
    """Rank 0's choice: the folder `--run-name` names, else the run the resumed checkpoint belongs to (or records),
    else the newest run of the task for `--resume auto`, else a new folder."""
    resume_from, from_artifact, recorded = None, False, {}
    if cfg.resume and cfg.resume != "auto":
        try:
            resume_from, from_artifact = resolve_source(cfg.resume, cfg.out_dir)
        except ConfigError as exc:
            raise ConfigError(f"resume: {exc}") from None
        recorded = recorded_run(resume_from)
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
            run_dir = new_run_dir(cfg.out_dir, f"{cfg.task}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        except OSError as exc:
            raise ConfigError(f"out_dir: cannot make a run folder in {cfg.out_dir} ({exc})") from None
    if cfg.resume and (found := run_task(run_dir)) not in (None, cfg.task):
        raise ConfigError(f"resume: {run_dir} is a run of the {found!r} task, not of {cfg.task!r}")
    if not cfg.resume and cfg.run_name and (used := used_run(run_dir)):
        raise ConfigError(
            f"run_name: {run_dir} holds {used}; add --resume auto to continue it, or choose another --run-name"
        )
    check_run_folder(run_dir)  # before anything is written in it
    if recorded.get("wandb_id") and not (run_dir / "wandb_id.txt").exists():  # continue its wandb run
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "wandb_id.txt", recorded["wandb_id"])
    return run_dir, resume_from


def recorded_run(checkpoint: Path) -> dict:
    """The run a checkpoint records ({name, wandb_id}), each name checked: data, one plain name, never a path."""
    recorded = checked_metadata(checkpoint, f"resume: {checkpoint}: cannot load checkpoint").get("run", {})
    recorded = recorded if isinstance(recorded, dict) else {}
    for key, form in (("name", is_plain_name), ("wandb_id", lambda value: WANDB_ID.fullmatch(value))):
        if recorded.get(key) is not None and not (isinstance(recorded[key], str) and form(recorded[key])):
            raise ConfigError(
                f"resume: {checkpoint} records the run {key} {recorded[key]!r}, which is not one plain folder name; "
                "give --run-name NAME"
            )
    return recorded


# ---------------------------------------------------------------- wandb model artifacts as sources


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
        if not is_plain_name(name) or not is_plain_name(alias or "latest"):
            raise ConfigError(f"{source!r}: expected wandb:NAME[:ALIAS], each one plain name")
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
        for relative, local in entries.items():  # checked: `model.ckpt` or a file in it
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
    from kibitz.tracking.sinks import wandb_records, wandb_segments

    versions = [
        r["artifact"]
        for log in wandb_segments(list(out_dir.glob("*/wandb")))
        for r in wandb_records(log)
        if r["type"] == "artifact" and r["artifact"]["name"] == name
    ]  # in logging order: vK is the K-th
    chosen = [a for k, a in enumerate(versions) if alias in a.get("aliases", []) or alias == f"v{k}"]
    if not chosen:
        return None
    entries = {e.get("path"): e.get("local_path") for e in chosen[-1]["manifest"]["contents"]}
    for path, local in entries.items():
        if not isinstance(path, str) or not ARTIFACT_ENTRY.fullmatch(path) or not is_plain_name(path.split("/")[-1]):
            raise ConfigError(
                f"wandb:{name}:{alias}: the artifact names the entry {path!r}, not model.ckpt or a file in it"
            )
        staged = isinstance(local, str) and Path(local).resolve().is_relative_to(out_dir.resolve())
        if not staged or Path(local).is_symlink():  # wandb stages under <run>/wandb/data
            raise ConfigError(f"wandb:{name}:{alias}: the artifact's entry {path} is not staged in {out_dir}'s runs")
    missing = [p for p in entries.values() if not Path(p).is_file()]
    return None if missing else entries  # synced (staging cleaned): the API has it


ARTIFACT_ENTRY = re.compile(r"model\.ckpt(/[^/]+)?")  # what `log_checkpoint` logs: a file, or a folder's files


class FolderBusy(ValueError):
    """Another living process holds a run folder's lock."""


def lock_folder(folder: Path):
    """Hold `folder/.lock` for as long as the returned file stays open: one writer per run folder. A POSIX record lock
    (lockf): it belongs to this process alone, so DataLoader workers forked later do not hold it, and the OS drops it
    when the process ends, however it ends: the folder of a killed run is taken over at once (and said so)."""
    folder.mkdir(parents=True, exist_ok=True)
    file = open_in_place(folder / ".lock", "a+")
    try:
        fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EACCES or EAGAIN: a living process holds it
        file.seek(0)
        holder = file.read().strip()
        file.close()
        holder = holder if holder.isprintable() and holder.startswith("process ") else "another process"
        raise FolderBusy(f"{folder} is in use by {holder}: one run writes a run folder at a time") from None
    file.seek(0)
    previous = file.read().strip()  # emptied by a run that ended; left by one that was killed
    file.truncate(0)
    file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    file.flush()
    if previous:
        previous = previous if previous.isprintable() else "a process"
        print(f"taking over {folder}: its previous run ({previous}) ended without releasing it", flush=True)
    return file


def unlock_folder(file) -> None:
    if file is not None and not file.closed:
        file.truncate(0)
        file.close()


def check_run_folder(run_dir: Path) -> None:
    """A run folder is written in place, so nothing in it may lead elsewhere: a link in it (a folder copied from
    someone else, say) is refused, never followed; the ids it records must have their one form."""
    if run_dir.is_symlink():
        raise ConfigError(f"run folder {run_dir} is a link; kibitz never follows links in a run folder")
    inside = [run_dir, run_dir / "checkpoints"]
    for entry in (entry for folder in inside if folder.is_dir() for entry in folder.iterdir()):
        if entry.is_symlink():
            raise ConfigError(
                f"{entry} is a link; kibitz never follows links in a run folder (remove it, or choose another "
                "--run-name)"
            )
    for name, form in (("wandb_id.txt", WANDB_ID), ("mlflow_id.txt", MLFLOW_ID)):
        recorded = (run_dir / name).read_text(errors="replace").strip() if (run_dir / name).is_file() else ""
        if recorded and not form.fullmatch(recorded):
            raise ConfigError(f"{run_dir / name}: expected a run id ({form.pattern}), got {recorded[:40]!r}")


WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MLFLOW_ID = re.compile(r"[0-9a-f]{32}")


def used_run(run_dir: Path) -> str | None:
    """What a folder holds of an earlier run ("a run at step N"), None if nothing: a run name is not used twice."""
    steps = [int(p.name[5:-5]) for p in (run_dir / "checkpoints").glob("step-*.ckpt") if p.name[5:-5].isdigit()]
    if steps:
        return f"a run at step {max(steps)}"
    if any((run_dir / name).exists() for name in ("config.json", "metrics.csv")):
        return "a run (without a checkpoint yet)"
    return None


@contextlib.contextmanager
def held(run):
    """The run's time in its folder: however it ends, the folder is released, and trackers that a failure or a stop
    from outside left open are closed as such (MLflow: FAILED, or KILLED for Ctrl+C and a sweep's early stop)."""
    try:
        yield
    except BaseException as exc:
        stopped = isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code in (0, None))
        if run.loggers:  # an error, a one-line one (SystemExit("error: ...")) too, is a failure
            run.loggers.finish("KILLED" if stopped else "FAILED")
        raise
    finally:
        unlock_folder(run.folder_lock)


@dataclasses.dataclass
class Trained:
    """What `train.train` returns: the test metrics of the best checkpoint, and the run's folder."""

    metrics: dict[str, float]
    run_dir: Path

    def show(self) -> None:
        """The pictures the run drew (curves.png, the task's test pictures): inline in a notebook, else their paths."""
        pictures = sorted(self.run_dir.glob("*.png"))
        if not distributed.in_notebook():
            print("\n".join(map(str, pictures)))
            return
        from IPython.display import Image, display

        for picture in pictures:
            display(Image(filename=str(picture)))
