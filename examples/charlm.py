"""A task that is not chess, in one file: a character-level transformer language model of a text file
(LICENSE by default) with every trainer feature. `python examples/charlm.py [--help]`, `fabric run --devices 2
examples/charlm.py`, `python examples/charlm.py evaluate --ckpt runs/charlm-.../checkpoints/last.ckpt`. Bytes are
the characters; the first 90 % of the file trains, the next 5 % validates, the last 5 % tests."""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the trainer, after this file's folder (its own)

import train  # noqa: E402
from config import DataConfig, RunConfig, ScheduleConfig, Task, TrainConfig, require  # noqa: E402
from data import ArrayDataset  # noqa: E402


@dataclass
class TextData(DataConfig):
    file: Path = Path(__file__).resolve().parent.parent / "LICENSE"
    """The text to model, read as bytes."""
    context: int = 64
    """Characters the model sees before each prediction."""


@dataclass
class CharModelConfig:
    width: int = 128
    """Channels per character."""
    depth: int = 2
    """Transformer blocks."""
    heads: int = 4
    """Attention heads per block."""


@dataclass
class CharConfig(RunConfig):
    """Train a character-level causal transformer on a text file; report bits per character."""

    model: CharModelConfig = field(default_factory=CharModelConfig)
    data: TextData = field(default_factory=lambda: TextData(batch_size=64, eval_batch_size=256))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=50, noam_d_model=128))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000, val_every=200))


def splits(cfg: CharConfig) -> dict[str, np.ndarray]:
    text = np.frombuffer(cfg.data.file.read_bytes(), dtype=np.uint8)
    a, b = int(len(text) * 0.9), int(len(text) * 0.95)
    return {"train": text[:a], "val": text[a:b], "test": text[b:]}


def datasets(cfg: CharConfig) -> dict[str, ArrayDataset]:
    """Windows of context + 1 bytes: every offset for training, back to back for evaluation."""
    windows = {k: np.lib.stride_tricks.sliding_window_view(v, cfg.data.context + 1) for k, v in splits(cfg).items()}
    return {k: ArrayDataset(v if k == "train" else v[:: cfg.data.context]) for k, v in windows.items()}


def unigram_entropy(cfg: CharConfig) -> float:
    """Bits per character of the file's own byte frequencies: the best a model that ignores context can do."""
    counts = np.bincount(np.frombuffer(cfg.data.file.read_bytes(), dtype=np.uint8), minlength=256)
    return float(-sum(p * np.log2(p) for p in counts[counts > 0] / counts.sum()))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).transpose(1, 3).unbind(2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # B x heads x T x head width
        x = x + self.out(attended.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class CharLM(nn.Module):
    def __init__(self, context: int, width: int, depth: int, heads: int):
        super().__init__()
        self.tokens_per_sample = context  # for tokens/s
        self.embed, self.position = nn.Embedding(256, width), nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 256)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        x = self.embed(chars) + self.position[: chars.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_model(cfg: CharConfig) -> nn.Module:
    return CharLM(cfg.data.context, cfg.model.width, cfg.model.depth, cfg.model.heads)


def next_char_loss(model, window: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(window[:, :-1].long())
    return F.cross_entropy(logits.flatten(0, 1), window[:, 1:].long().flatten(), reduction=reduction)


def train_step(cfg: CharConfig, model, batch, step: int, train_size: int):
    loss = next_char_loss(model, batch[0])
    return loss


@torch.no_grad()
def eval_step(cfg: CharConfig, model, batch) -> dict:
    (window,) = batch
    return {"nats": next_char_loss(model, window, "sum"), "chars": torch.tensor(window[:, 1:].numel())}


def eval_metrics(cfg: CharConfig, sums: dict) -> dict:
    loss = float(sums["nats"]) / max(float(sums["chars"]), 1)
    return {"bpc": loss / np.log(2), "loss": loss, "chars": float(sums["chars"])}


def report(cfg: CharConfig, metrics: dict) -> tuple[str, dict]:
    bpc, entropy = metrics["bpc"], unigram_entropy(cfg)
    rows = {"bits per char": bpc, "file unigram entropy": entropy, "below it": entropy - bpc}
    return f"{int(metrics['chars'])} characters of {cfg.data.file.name}", rows


def check(cfg: CharConfig) -> None:
    require(cfg.data.file.is_file(), "data.file", "a text file", str(cfg.data.file))
    require(cfg.data.context >= 1, "data.context", "a count >= 1", cfg.data.context)
    size, least = cfg.data.file.stat().st_size, 20 * (cfg.data.context + 1)  # val and test get 5 % each
    require(size >= least, "data.file", f"a text of at least {least} bytes for a context of {cfg.data.context}", size)
    require(cfg.model.width % cfg.model.heads == 0, "model.width", "a multiple of model.heads", cfg.model.width)


METRICS = {"val/bpc": "min", "val/loss": "min"}  # the first ranks checkpoints
TASK = Task(
    "charlm",
    CharConfig,
    build_model,
    datasets,
    train_step,
    METRICS,
    eval_step=eval_step,
    eval_metrics=eval_metrics,
    report=report,
    check=check,
    blocks=(Block,),
)

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:], task=TASK))
