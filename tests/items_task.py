"""A per-example task for tests, shaped the way PyTorch tutorials teach: a map-style Dataset whose __getitem__ returns
one dict example with random augmentation (torch and numpy noise), read in worker processes.

    python tests/items_task.py --out-dir runs --data.num-workers 2
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the trainer, after this folder

import train  # noqa: E402
from config import (  # noqa: E402
    CheckpointConfig,
    DataConfig,
    LogConfig,
    MonitorConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    Task,
    TrainConfig,
)


class Points(torch.utils.data.Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray, augment: bool):
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        x = torch.from_numpy(self.x[i])
        if self.augment:  # drawn in the worker that reads the example
            x = x + 0.1 * torch.randn(4) + float(np.random.uniform(-0.05, 0.05))
        return {"features": x, "target": torch.tensor([self.y[i]])}


@dataclass
class ItemsConfig(RunConfig):
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=32, eval_batch_size=64, num_workers=2))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=40, val_every=20))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=0))
    log: LogConfig = field(default_factory=lambda: LogConfig(logger=("csv",), every=1, progress_bar=False))
    monitor: MonitorConfig = field(default_factory=lambda: MonitorConfig(histogram_every=None))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=5, keep_best=-1))


def datasets(cfg: ItemsConfig) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(640, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)).astype(np.float32)
    return {
        "train": Points(x[:512], y[:512], True),
        "val": Points(x[512:576], y[512:576], False),
        "test": Points(x[576:], y[576:], False),
    }


def build_model(cfg: ItemsConfig) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))


def train_step(cfg, model, batch: dict, step, train_size):
    loss = torch.nn.functional.mse_loss(model(batch["features"]), batch["target"])
    return loss


def eval_step(cfg, model, batch: dict) -> dict:
    error = torch.nn.functional.mse_loss(model(batch["features"]), batch["target"], reduction="sum")
    return {"mse": error, "count": torch.tensor(len(batch["target"]))}


TASK = Task("items", ItemsConfig, build_model, datasets, train_step, {"val/mse": "min"}, eval_step=eval_step)

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:], task=TASK))
