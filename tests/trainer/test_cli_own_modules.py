"""A task's own modules are its own: a task folder with its own model.py and losses.py trains and evaluates in every
way a task file is run (from another directory too), and its config class names no task; one holding a module named
like one of the trainer's (config.py) gets one line."""

import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, run_script

TASK = """
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

sys.path.insert(1, {root!r})  # the trainer, after this folder: its model.py and losses.py are this task's
import train
from config import DataConfig, LogConfig, MonitorConfig, RunConfig, ScheduleConfig, Task, TrainConfig
from data import ArrayDataset
from losses import squared_error  # this folder's, not the chess task's
from model import Net  # this folder's


@dataclass
class ShapesConfig(RunConfig):
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=32, eval_batch_size=64))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=6, val_every=3))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=0))
    log: LogConfig = field(default_factory=lambda: LogConfig(logger=("csv",), progress_bar=False))
    monitor: MonitorConfig = field(default_factory=lambda: MonitorConfig(histogram_every=None))


def datasets(cfg):
    x = np.random.default_rng(0).normal(size=(256, 3)).astype(np.float32)
    y = x.sum(1, keepdims=True)
    return {{"train": ArrayDataset(x[:192], y[:192]), "val": ArrayDataset(x[192:224], y[192:224]),
            "test": ArrayDataset(x[224:], y[224:])}}


def train_step(cfg, model, batch, step, train_size):
    loss = squared_error(model(batch[0]), batch[1]).mean()
    return loss


@torch.no_grad()
def evaluate(fabric, cfg, model, loader):
    model.eval()
    loader.sampler.start_epoch(0)
    total = sum(squared_error(model(x), y).sum() for x, y in loader)
    model.train()
    return {{"mse": fabric.all_reduce(total, reduce_op="sum").item() / 32}}, {{}}


TASK = Task("shapes", ShapesConfig, lambda cfg: Net(), datasets, train_step, {{"val/mse": "min"}},
            evaluate=evaluate)

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:], task=TASK))
"""

MODEL = "import torch\n\n\nclass Net(torch.nn.Linear):\n    def __init__(self):\n        super().__init__(3, 1)\n"
LOSSES = "def squared_error(output, target):\n    return (output - target) ** 2\n"


@pytest.fixture
def task_folder(tmp_path) -> Path:
    folder = tmp_path / "mytask"
    folder.mkdir()
    (folder / "shapes.py").write_text(TASK.format(root=str(ROOT)))
    (folder / "model.py").write_text(MODEL)
    (folder / "losses.py").write_text(LOSSES)
    return folder


@pytest.mark.slow
def test_a_task_folder_with_its_own_model_and_losses_runs_every_way(task_folder, tmp_path):
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    task, trainer = str(task_folder / "shapes.py"), str(ROOT / "train.py")
    fabric = str(Path(sys.executable).parent / "fabric")
    runs = {
        "direct": ([task], sys.executable),
        "trainer": ([trainer, task, "--run-name", "trainer"], sys.executable),
        "fabric": (
            ["run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--main-port", free_port(), task]
            + ["--run-name", "f"],
            fabric,
        ),
    }
    for name, (command, program) in runs.items():
        result = run_script([*command, "--out-dir", str(out)], cwd=elsewhere, program=program)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        assert "test metrics (shapes)" in result.stdout, name
    (direct,) = out.glob("shapes-*")  # no run name given: the folder is named by the task, given once
    ckpt = str(direct / "checkpoints" / "last.ckpt")
    for command in ([task, "evaluate", "--ckpt", ckpt], [trainer, task, "evaluate", "--ckpt", ckpt]):
        result = run_script(command, cwd=elsewhere)
        assert result.returncode == 0 and "test metrics of" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow  # starts processes of its own
def test_a_task_module_named_like_the_trainers_is_one_line(task_folder, tmp_path):
    (task_folder / "config.py").write_text("SETTING = 1\n")
    task = str(task_folder / "shapes.py")
    for command in ([task], [str(ROOT / "train.py"), task]):
        result = run_script([*command, "--out-dir", str(tmp_path / "out")], cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [
            f"error: task: {task_folder / 'config.py'} has the name of the trainer's {ROOT / 'config.py'}: one would "
            "be imported in the other's place; rename yours (say my_config.py)"
        ]
