"""The common case, in one file: an image classifier whose data is a per-example torch Dataset, as tutorials teach.
scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download: `pip install -e '.[examples]'`); each
training image is randomly shifted and noised in __getitem__, in worker processes; examples are dicts.

    python examples/digits.py                            # about a minute on a laptop CPU, test accuracy about 0.98
    python examples/digits.py --data.num-workers 0 --train.max-steps 200
    python train.py examples/digits.py evaluate --ckpt runs/digits-.../checkpoints/last.ckpt
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the trainer, after this file's folder (its own)

import train  # noqa: E402
from config import DataConfig, OptimConfig, RunConfig, ScheduleConfig, Task, TrainConfig  # noqa: E402


@dataclass
class DigitsConfig(RunConfig):
    """Classify scikit-learn's 8x8 digits with a small CNN."""

    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=64, eval_batch_size=256, num_workers=2))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=50))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=600, val_every=100))


class Digits(torch.utils.data.Dataset):
    """One example per index: {"image": 1x8x8 floats in [0, 1], "label": 0-9}, shifted and noised when training."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(self.images[i]).float().div(16)[None]
        if self.augment:  # drawn in the worker reading it; the trainer seeds it, so a resumed run sees the same
            dy, dx = torch.randint(-1, 2, (2,)).tolist()
            image = torch.roll(image, (dy, dx), dims=(1, 2)) + 0.05 * torch.randn_like(image)
        return {"image": image, "label": int(self.labels[i])}


def datasets(cfg: DigitsConfig) -> dict[str, Digits]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))  # a fixed split: 1,437 / 180 / 180
    parts = {"train": order[:1437], "val": order[1437:1617], "test": order[1617:]}
    return {k: Digits(digits.images[i], digits.target[i], augment=k == "train") for k, i in parts.items()}


def build_model(cfg: DigitsConfig) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def train_step(cfg: DigitsConfig, model, batch: dict, step: int, train_size: int):
    logits = model(batch["image"])
    loss = nn.functional.cross_entropy(logits, batch["label"])
    return loss, {"acc": (logits.argmax(1) == batch["label"]).float().mean()}


def eval_step(cfg: DigitsConfig, model, batch: dict) -> dict:
    """This batch's sums; the trainer adds them up over the split and the ranks and divides each by the count."""
    logits = model(batch["image"])
    return {
        "loss": nn.functional.cross_entropy(logits, batch["label"], reduction="sum"),
        "acc": (logits.argmax(1) == batch["label"]).sum(),
        "count": torch.tensor(len(logits)),
    }


TASK = Task(
    "digits",
    DigitsConfig,
    build_model,
    datasets,
    train_step,
    {"val/acc": "max", "val/loss": "min"},
    eval_step=eval_step,
)

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:], task=TASK))
