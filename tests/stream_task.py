"""A task whose data are streams (torch IterableDatasets), for tests: records made from their index as if read from
an endless file (`--data.source records`), or JSONL files read by Hugging Face `datasets` with streaming=True
(`--data.source hf --data.files DIR`, no hub, no network). Each rank and worker reads its own part."""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the trainer, after this folder

import train  # noqa: E402
from config import (  # noqa: E402  # noqa: E402
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
from data import reader_part  # noqa: E402

WEIGHTS = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)


def record(i: int) -> dict:
    x = np.random.default_rng(i).normal(size=4).astype(np.float32)
    return {"x": torch.from_numpy(x), "y": torch.tensor(float(x @ WEIGHTS))}


class Records(torch.utils.data.IterableDataset):
    """Records first..first+count (endless if count is None); the state is the next index this reader reads."""

    def __init__(self, first: int, count: int | None):
        self.first, self.count, self.next = first, count, None

    def __iter__(self):
        part, parts = reader_part()
        i = self.next if self.next is not None else self.first + part
        while self.count is None or i < self.first + self.count:
            self.next = i + parts
            yield record(i)
            i += parts
        self.next = None  # read again from the start

    def state_dict(self) -> dict:
        return {"next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.next = state["next"]


class Forgetful(Records):
    """A stream that cannot say where it is."""

    state_dict = load_state_dict = None

    def __getattribute__(self, name):
        if name in ("state_dict", "load_state_dict"):
            raise AttributeError(name)
        return super().__getattribute__(name)


@dataclass
class StreamData(DataConfig):
    source: Literal["records", "hf", "forgetful"] = "records"
    files: Path = Path("streams")
    """hf: the folder of train.jsonl, val.jsonl and test.jsonl."""


@dataclass
class StreamConfig(RunConfig):
    data: StreamData = field(default_factory=lambda: StreamData(batch_size=32, eval_batch_size=64))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=40, val_every=20))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=0))
    log: LogConfig = field(default_factory=lambda: LogConfig(logger=("csv",), every=1, progress_bar=False))
    monitor: MonitorConfig = field(default_factory=lambda: MonitorConfig(histogram_every=None))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=5, keep_best=-1))


def datasets(cfg: StreamConfig) -> dict:
    if cfg.data.source != "hf":
        kind = Forgetful if cfg.data.source == "forgetful" else Records
        return {"train": kind(0, None), "val": Records(10**6, 128), "test": Records(2 * 10**6, 128)}
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    part, parts = reader_part()  # here, in the main process: this rank among the ranks
    splits = {}
    for split in ("train", "val", "test"):
        stream = load_dataset("json", data_files=str(cfg.data.files / f"{split}.jsonl"), streaming=True, split="train")
        splits[split] = split_dataset_by_node(stream.with_format("torch"), rank=part, world_size=parts)
    return splits


def build_model(cfg: StreamConfig) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))


def train_step(cfg, model, batch: dict, step, train_size):
    return torch.nn.functional.mse_loss(model(batch["x"]).squeeze(1), batch["y"])


def eval_step(cfg, model, batch: dict) -> dict:
    error = torch.nn.functional.mse_loss(model(batch["x"]).squeeze(1), batch["y"], reduction="sum")
    return {"mse": error, "count": torch.tensor(len(batch["y"]))}


TASK = Task("stream", StreamConfig, build_model, datasets, train_step, {"val/mse": "min"}, eval_step=eval_step)

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:], task=TASK))
