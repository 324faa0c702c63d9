"""Metric sinks, used on rank 0 only. Each has `log(metrics, step)`, `summary(metrics)`, `finish()`.

`metrics.csv` (long format: step,name,value) is the run's own record: written for every logger
except `none`, flushed on every write so a crash loses nothing. wandb (offline by default: the run
folder is one `wandb sync` uploads) or TensorBoard can be added beside it.
"""

import csv
import json
import os
import secrets
from pathlib import Path


class CSVLog:
    def __init__(self, path: Path):
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "name", "value"])

    def log(self, metrics: dict, step: int) -> None:
        self.writer.writerows([step, name, value] for name, value in metrics.items())
        self.file.flush()

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self) -> None:
        self.file.close()


class WandbLog:
    """An offline (or online) wandb run inside the run folder. The run id is kept in the run folder,
    so a resumed run continues the same wandb run."""

    def __init__(self, run_dir: Path, project: str, mode: str, config: dict):
        import wandb  # slow to import: only when used

        id_file = run_dir / "wandb_id.txt"
        # secrets, not random: drawing from the training RNG here would change the run.
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, name=run_dir.name, id=run_id, dir=run_dir, mode=mode,
                              config=config, resume="allow")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def finish(self) -> None:
        self.run.finish()


class TensorBoardLog:
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def summary(self, metrics: dict) -> None:
        self.writer.add_text("test", "\n".join(f"{k}: {v:.4f}" for k, v in metrics.items()))

    def finish(self) -> None:
        self.writer.close()


class Loggers:
    """Fans out to the CSV and the chosen tracker."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, metrics: dict, step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def summary(self, metrics: dict) -> None:
        for sink in self.sinks:
            sink.summary(metrics)

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish()


def make_loggers(kind: str, run_dir: Path, project: str, wandb_mode: str, config: dict) -> Loggers:
    if kind == "none":
        return Loggers([])
    sinks = [CSVLog(run_dir / "metrics.csv")]
    if kind == "wandb" and wandb_mode != "disabled":
        sinks.append(WandbLog(run_dir, project, wandb_mode, config))
    elif kind == "tensorboard":
        sinks.append(TensorBoardLog(run_dir, config))
    return Loggers(sinks)
