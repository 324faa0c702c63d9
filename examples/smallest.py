"""The smallest task: fit y = 3x - 1 to noisy points. The shared RunConfig as its config, arrays as its data."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the trainer, after this file's folder (its own)
import train  # noqa: E402
from config import RunConfig, Task  # noqa: E402
from data import ArrayDataset  # noqa: E402


def datasets(cfg):
    x = np.random.default_rng(0).uniform(-1, 1, (3000, 1)).astype(np.float32)
    y = 3 * x - 1 + np.random.default_rng(1).normal(0, 0.1, x.shape).astype(np.float32)
    return {
        "train": ArrayDataset(x[:2000], y[:2000]),
        "val": ArrayDataset(x[2000:2500], y[2000:2500]),
        "test": ArrayDataset(x[2500:], y[2500:]),
    }


def train_step(cfg, model, batch, step, train_size):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def eval_step(cfg, model, batch):
    return {"mse": torch.nn.functional.mse_loss(model(batch[0]), batch[1], reduction="sum"), "count": len(batch[1])}


TASK = Task(
    "line", RunConfig, lambda cfg: torch.nn.Linear(1, 1), datasets, train_step, {"val/mse": "min"}, eval_step=eval_step
)

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:], task=TASK))
