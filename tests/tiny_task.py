"""A trainer-sized task for tests: linear regression of 4 features on 512 fixed random points, in memory.
`mistaken(...)` gives the same task with one of its functions replaced, as a user's task with a mistake."""

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from config import DataConfig, LogConfig, MonitorConfig, RunConfig, ScheduleConfig, Task, TrainConfig
from data import ArrayDataset


@dataclass
class TinyConfig(RunConfig):
    """Linear regression on random points."""

    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=32, eval_batch_size=64))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=8, val_every=4))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=0))
    log: LogConfig = field(default_factory=lambda: LogConfig(logger=("csv",), every=2, progress_bar=False))
    monitor: MonitorConfig = field(default_factory=lambda: MonitorConfig(histogram_every=None))


def datasets(cfg: TinyConfig) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32))[:, None]
    return {
        "train": ArrayDataset(x[:384], y[:384]),
        "val": ArrayDataset(x[384:448], y[384:448]),
        "test": ArrayDataset(x[448:], y[448:]),
    }


def build_model(cfg: TinyConfig) -> torch.nn.Module:
    return torch.nn.Linear(4, 1)


def train_step(cfg, model, batch, step, train_size):
    x, y = batch
    loss = torch.nn.functional.mse_loss(model(x), y)
    return loss


@torch.no_grad()
def evaluate(fabric, cfg, model, loader) -> tuple[dict, dict]:
    model.eval()
    sums = torch.zeros(2, device=fabric.device, dtype=torch.float64)
    loader.sampler.start_epoch(0)
    for x, y in loader:
        sums += torch.stack([torch.nn.functional.mse_loss(model(x), y, reduction="sum"), torch.tensor(len(y))])
    model.train()
    total, count = fabric.all_reduce(sums, reduce_op="sum").tolist()
    return {"mse": total / count}, {}


def report(cfg, metrics: dict) -> tuple[str, dict]:
    return "tiny regression", {"mse": metrics["mse"]}


TASK = Task("tiny", TinyConfig, build_model, datasets, train_step, {"val/mse": "min"}, evaluate=evaluate, report=report)


def mistaken(**functions) -> Task:
    return dataclasses.replace(TASK, **functions)
