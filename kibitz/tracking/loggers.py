"""A run's loggers, on rank 0 only: `Loggers` fans out to the sinks of sinks.py and mlflow_sink.py (metrics.csv,
always: the run's own record; wandb, TensorBoard and MLflow beside it, any of them), and owns the histogram thread
(`Sender`), which writes through it. A sink that fails is reported once and switched off: logging never stops training.
"""

import os
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from kibitz.tracking.sinks import CSVLog, TensorBoardLog, WandbLog


class Loggers:
    """Fans out to the CSV and the chosen trackers. The histogram thread (`Sender`) writes through `write`; the loop's
    `log` first lets it finish, so steps reach wandb in order."""

    def __init__(self, sinks: list):
        self.sinks = sinks
        self.lock = threading.Lock()
        self.sender = None  # a Sender (below), started by the first histograms

    def send_histograms(self, step: int, prefix: str, names: list[str], stats) -> None:
        """Histogram rows still on the device (monitor.tensor_stats): copied without blocking, sent by a thread."""
        if self.sender is None:
            self.sender = Sender(self)
        self.sender.send(step, prefix, names, stats)

    def log(self, metrics: dict, step: int) -> None:
        if self.sender is not None:
            self.sender.flush()
        self.write(metrics, step)

    def _each(self, method: str, *args) -> None:
        """Call `method` on every sink. A sink that fails (wandb gone, the disk of the run folder full)
        is reported once and switched off; training goes on with the others."""
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as exc:
                self.sinks.remove(sink)
                print(
                    f"warning: logger {type(sink).__name__} failed in {method} ({type(exc).__name__}: {exc}); "
                    "it is switched off, training continues",
                    flush=True,
                )

    def write(self, metrics: dict, step: int) -> None:
        with self.lock:
            self._each("log", metrics, step)

    def log_histograms(self, histograms: dict, step: int) -> None:
        with self.lock:
            self._each("log_histograms", histograms, step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        with self.lock:
            self._each("log_table", name, columns, rows, step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        with self.lock:
            self._each("log_image", name, path, step)

    def log_checkpoint(self, path: Path, name: str, aliases: list[str], dropped: list[str]) -> None:
        with self.lock:
            self._each("log_checkpoint", path, name, aliases, dropped)

    def summary(self, metrics: dict) -> None:
        self._each("summary", metrics)

    def finish(self, status: str = "FINISHED") -> None:
        """Close every sink once; `status` (FINISHED, KILLED or FAILED) says how the run ended."""
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        self._each("finish", status)
        self.sinks = []


def to_host(stats: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start one non-blocking copy into pinned host memory; the event says when it has landed."""
    if stats.device.type != "cuda":
        return stats.cpu(), None
    host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
    host.copy_(stats, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class Sender:
    """A background thread that waits for copies to land and hands numpy payloads to the loggers,
    so the training loop never waits for histograms."""

    def __init__(self, loggers):
        self.loggers = loggers
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="histogram-sender", daemon=True)
        self.thread.start()

    def send(self, step: int, prefix: str, names: list[str], stats: torch.Tensor) -> None:
        host, event = to_host(stats)
        self.jobs.put((step, prefix, names, host, event))

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            step, prefix, names, host, event = job
            if event is not None:
                event.synchronize()
            values = host.numpy().astype(np.float64)
            histograms = {}
            for name, row in zip(names, values):
                lo, hi, counts = row[0], row[1], row[5:]
                edges = np.linspace(lo, hi if hi > lo else lo + 1, len(counts) + 1)
                mean, std = row[2], row[3]
                if np.isnan(mean):  # not computed: estimate from the bin centres (TensorBoard wants them)
                    centres = (edges[:-1] + edges[1:]) / 2
                    mean = float((counts * centres).sum() / max(counts.sum(), 1))
                    std = float(np.sqrt(max((counts * (centres - mean) ** 2).sum() / max(counts.sum(), 1), 0)))
                histograms[f"{prefix}/{name}"] = (counts, edges, mean, std)
            self.loggers.log_histograms(histograms, step)
            self.jobs.task_done()
        self.jobs.task_done()

    def flush(self) -> None:
        """Wait until everything queued has been sent."""
        self.jobs.join()

    def close(self) -> None:
        """Send whatever is queued, then stop."""
        self.jobs.put(None)
        self.jobs.join()


def open_for(fabric, cfg, task, run_dir: Path, resume_step: int | None) -> Loggers:
    """The loggers of a run (rank 0): the config as parameters, the task's metric directions as summaries."""
    from kibitz import configfile

    config = configfile.to_dict(cfg)
    mlflow = None
    if "mlflow" in cfg.log.logger:
        uri = mlflow_uri(cfg)
        code = configfile.code_version()
        tags = {
            "task": task.name,
            "mlflow.source.git.commit": code["commit"] or "unknown",  # MLflow's own tag: its UI shows it
            "git.dirty": str(code["dirty"]).lower(),
            "kibitz.version": kibitz_version(),
            "world_size": str(fabric.world_size),
            "device": device_name(fabric.device),
        }
        mlflow = {"uri": uri, "experiment": cfg.log.project, "tags": tags}
    return make_loggers(
        cfg.log.logger, run_dir, cfg.log.project, cfg.log.wandb_mode, config, resume_step, task.metrics, mlflow
    )


def mlflow_uri(cfg, out_dir: Path | None = None) -> str:
    """--log.mlflow-uri, else $MLFLOW_TRACKING_URI, else the local store in `out_dir` (default: the run's out dir)."""
    return cfg.log.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_mlflow_uri(out_dir or cfg.out_dir)


def local_mlflow_uri(out_dir: Path) -> str:
    """MLflow's own default is ./mlflow.db wherever the run starts: beside the runs instead, with no server."""
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def kibitz_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kibitz")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def make_loggers(
    kinds: tuple[str, ...],
    run_dir: Path,
    project: str,
    wandb_mode: str,
    config: dict,
    resume_step: int | None = None,
    summaries: dict[str, str] | None = None,
    mlflow: dict | None = None,
) -> Loggers:
    """`kinds`: the trackers beside metrics.csv; `resume_step`: the step a resumed run continues from (CSV rows after it
    are dropped); `summaries`: {metric: "min" or "max"}, what wandb's run summary keeps of each (its best); `mlflow`:
    the tracking URI, experiment and tags."""
    if "none" in kinds:
        return Loggers([])
    sinks = [CSVLog(run_dir / "metrics.csv", resume_step)]
    for kind in dict.fromkeys(kinds):
        try:
            if kind == "wandb" and wandb_mode != "disabled":
                sinks.append(WandbLog(run_dir, project, wandb_mode, config, resume_step, summaries))
            elif kind == "tensorboard":
                sinks.append(TensorBoardLog(run_dir, config))
            elif kind == "mlflow":
                from kibitz.tracking.mlflow_sink import MlflowLog

                sinks.append(
                    MlflowLog(run_dir, mlflow["uri"], mlflow["experiment"], config, mlflow["tags"], resume_step)
                )
        except Exception as exc:  # a tracker that cannot start must not cost the run
            print(
                f"warning: the {kind} logger could not start ({type(exc).__name__}: {exc}); "
                f"training continues without it ({run_dir / 'metrics.csv'} has every metric)",
                flush=True,
            )
    return Loggers(sinks)
