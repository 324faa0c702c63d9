"""A task's mistakes are one line naming the task, the function and what it gave, before training; metrics that lie
(NaN, an unknown direction) are refused; --init-from with --resume auto initialises once, then resumes."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ITEMS_TASK, ROOT, child_env, run_python, started
from tiny_task import TASK, build_model, evaluate, mistaken, train_step

import train


def run(tmp_path, task, *flags: str) -> int:
    return train.main(["--out-dir", str(tmp_path), "--run-name", "r", *flags], task=task)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def vector_loss(cfg, model, batch, step, train_size):
    x, y = batch
    loss = ((model(x) - y) ** 2).mean(1)
    return loss, loss.detach().mean()


def two_values(cfg, model, batch, step, train_size):
    loss = train_step(cfg, model, batch, step, train_size)
    return loss, torch.stack([loss.detach(), loss.detach()])


def tensor_metric(fabric, cfg, model, loader):
    metrics, histograms = evaluate(fabric, cfg, model, loader)
    return {"mse": torch.tensor(metrics["mse"])}, histograms


def frozen(cfg):
    return build_model(cfg).requires_grad_(False)


def raises_in_check(cfg):
    raise ValueError("width must be even")


def raises_in_evaluate(fabric, cfg, model, loader):
    return {}["mse"], {}


MISTAKES = {
    "a metric evaluate never returns": (
        dict(metrics={"val/acc": "max"}),
        "task tiny: evaluate (tiny_task.py): returned no acc (Task.metrics names val/acc); it returned mse",
    ),
    "metrics={}": (dict(metrics={}), "task tiny: Task.metrics: expected at least one validation metric"),
    "a direction other than min/max": (dict(metrics={"val/mse": "lowest"}), "expected 'min' or 'max', got 'lowest'"),
    "train_step returns a float": (
        dict(train_step=lambda *a: train_step(*a).item()),
        "task tiny: train_step (test_contract.py): expected the loss (a scalar tensor with a gradient), or "
        "(loss, {name: value to log}), got a float",
    ),
    "train_step returns a detached loss": (
        dict(train_step=lambda *a: train_step(*a).detach()),
        "got a tensor of shape () (torch.float32) without a gradient",
    ),
    "train_step returns a vector loss": (
        dict(train_step=vector_loss),
        "got (a tensor of shape (32,) (torch.float32), ...)",
    ),
    "train_step logs a vector": (
        dict(train_step=lambda *a: (train_step(*a), {"both": torch.zeros(2)})),
        "expected {name: a scalar tensor or number} to log",
    ),
    "train_step in the dropped (loss, tensor) form": (
        dict(train_step=lambda *a: (lambda loss: (loss, loss.detach()))(train_step(*a))),
        "or (loss, {name: value to log}), got (loss, a tensor of shape () (torch.float32))",
    ),
    "train_step returns (loss, a tensor of two)": (dict(train_step=two_values), "got (loss, a tensor of shape (2,)"),
    "no test split": (
        dict(datasets=lambda cfg: {k: v for k, v in TASK.datasets(cfg).items() if k != "test"}),
        "task tiny: datasets (test_contract.py): expected a dict with the splits train, val and test, got "
        "['train', 'val']",
    ),
    "evaluate returns a tensor": (
        dict(evaluate=tensor_metric),
        "task tiny: evaluate (test_contract.py): metric 'mse' is a tensor of shape () (torch.float32); expected "
        "a Python number",
    ),
    "a model without trainable parameters": (dict(build_model=frozen), "the model has no trainable parameters"),
    "check raises a plain ValueError": (
        dict(check=raises_in_check),
        "error: task tiny: check raised ValueError: width must be even",
    ),
    "evaluate raises": (
        dict(evaluate=raises_in_evaluate),
        "task tiny: evaluate (test_contract.py) raised KeyError",
    ),
    "eval_step returns a non-tensor": (
        dict(evaluate=None, eval_step=lambda cfg, model, batch: {"mse": "low", "count": 1}),
        "task tiny: eval_step: expected {name: a tensor of this batch's sums}, got {'mse': 'str', 'count': 'int'}",
    ),
    "eval_step without a count": (
        dict(evaluate=None, eval_step=lambda cfg, model, batch: {"mse": torch.zeros(())}),
        "task tiny: eval_step: returned no 'count' (the examples in the batch)",
    ),
    "a misspelt hook name": (
        dict(hooks=lambda cfg, datasets: {"on_validaton_end": [lambda run: None]}),
        "error: hooks: 'on_validaton_end' is not a point the loop calls (expected one of on_train_start,",
    ),
    "both evaluate and eval_step": (
        dict(eval_step=lambda cfg, model, batch: {}),
        "Task.eval_step: expected a function (the trainer runs the evaluation), or else Task.evaluate",
    ),
}


def squared_errors(cfg, model, batch):
    x, y = batch
    return {"mse": ((model(x) - y) ** 2).sum(), "count": torch.tensor(len(y))}


def test_eval_step_gives_the_metrics_the_whole_evaluate_gives(tmp_path, capsys):
    assert run(tmp_path / "whole", TASK) == 0
    assert run(tmp_path / "steps", mistaken(evaluate=None, eval_step=squared_errors)) == 0
    whole, steps = (json.loads((tmp_path / k / "r" / "test_metrics.json").read_text()) for k in ("whole", "steps"))
    assert steps["test/mse"] == pytest.approx(whole["test/mse"], rel=1e-6) and steps["test/count"] == 64


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_task_mistake_is_one_line_before_training(tmp_path, capsys, mistake):
    changes, expected = MISTAKES[mistake]
    assert run(tmp_path, mistaken(**changes)) == 2
    assert expected in one_line(capsys)
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained, nothing saved


def test_the_tiny_task_itself_trains(tmp_path, capsys):
    assert run(tmp_path, TASK) == 0  # so every failure above is the mistake's


def test_train_step_may_return_the_loss_alone_or_values_to_log_by_name(tmp_path):
    def with_values(*args):
        loss = train_step(*args)
        return loss, {"half": loss.detach() / 2, "step": args[3]}

    for name, step in (("alone", train_step), ("named", with_values)):
        assert train.main(["--out-dir", str(tmp_path), "--run-name", name], task=mistaken(train_step=step)) == 0
    logged = {name: (tmp_path / name / "metrics.csv").read_text() for name in ("alone", "named")}
    assert "train/loss" in logged["alone"] and "train/half" not in logged["alone"]
    rows = [line.split(",") for line in logged["named"].splitlines()]
    at_2 = {row[1]: float(row[2]) for row in rows if row[0] == "2"}
    assert at_2["train/half"] == pytest.approx(at_2["train/loss"] / 2) and at_2["train/step"] == 0.5  # steps 0, 1


def test_a_syntax_error_in_a_task_file_is_one_line(tmp_path, capsys):
    task_file = tmp_path / "broken.py"
    task_file.write_text("TASK = (\n")
    assert train.main([str(task_file)]) == 2
    line = one_line(capsys)
    assert line.startswith(f"error: task: {task_file}: line") and "SyntaxError" in line


LAST_WEEK = """
from tiny_task import TinyConfig, build_model, datasets, evaluate, report, train_step

from config import Task

TASK = {task}
"""


@pytest.mark.parametrize(
    "task, expected",
    [  # last week's README form: evaluate and report between train_step and metrics, all by position
        (
            'Task("old", TinyConfig, build_model, datasets, train_step, evaluate, report, {"val/mse": "min"})',
            "line 6 expected Task(name, config, build_model, datasets, train_step, metrics, eval_step=..., ...)",
        ),
        (  # a function where the metrics go
            'Task("old", TinyConfig, build_model, datasets, train_step, evaluate)',
            'Task.metrics: expected at least one validation metric, {"val/name": "min" or "max"}, the sixth field',
        ),
        (  # a field that is gone: the logged values are named in train_step's return
            'Task("old", TinyConfig, build_model, datasets, train_step, {"val/mse": "min"}, train_fields=("loss",))',
            "line 6 Task.train_fields: no longer a field; name the values train_step logs: (loss, {name: value})",
        ),
        (  # an instance where the class goes
            'Task("old", TinyConfig(), build_model, datasets, train_step, {"val/mse": "min"}, evaluate=evaluate)',
            "Task.config: expected the task's RunConfig subclass (the class itself), got 'an instance of TinyConfig'",
        ),
    ],
)
def test_a_task_in_an_older_form_or_with_a_wrongly_typed_field_is_one_line(tmp_path, capsys, task, expected):
    task_file = tmp_path / "old_task.py"
    task_file.write_text(LAST_WEEK.format(task=task))
    assert train.main([str(task_file), "--out-dir", str(tmp_path)]) == 2
    line = one_line(capsys)
    assert expected in line, line
    assert not list(tmp_path.glob("*/checkpoints"))


def nan_at(calls: set[int]):
    """evaluate, NaN at the given calls (1: the dry run at the start, 2: the first validation, ...)."""
    count = 0

    def patched(fabric, cfg, model, loader):
        nonlocal count
        count += 1
        metrics, histograms = evaluate(fabric, cfg, model, loader)
        return {"mse": math.nan if count in calls else metrics["mse"]}, histograms

    return patched


@pytest.mark.parametrize("nan_validation", [2, 3])
def test_a_nan_validation_metric_is_never_best_and_deletes_nothing_finite(tmp_path, capsys, nan_validation):
    task = mistaken(evaluate=nan_at({nan_validation}))
    assert run(tmp_path, task, "--checkpoint.keep-best", "1") == 0
    finite_step = 8 if nan_validation == 2 else 4
    kept = sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("step-*"))
    assert kept == [f"step-{finite_step:08d}.ckpt"]
    assert f"testing the best checkpoint: step-{finite_step:08d}.ckpt" in capsys.readouterr().out


def test_only_nan_validations_test_the_final_weights(tmp_path, capsys):
    assert run(tmp_path, mistaken(evaluate=nan_at({2, 3})), "--train.early-stop-patience", "5") == 0
    assert "no validation gave a finite val/mse: testing the final weights" in capsys.readouterr().out


def test_init_from_with_resume_auto_initialises_the_first_start_and_resumes_the_later_ones(tmp_path, capsys):
    assert run(tmp_path, TASK) == 0
    source = str(tmp_path / "r" / "checkpoints" / "last.ckpt")
    again = ["--out-dir", str(tmp_path), "--run-name", "fine", "--init-from", source, "--resume", "auto"]
    capsys.readouterr()
    assert train.main([*again, "--train.max-steps", "4"], task=TASK) == 0
    first = capsys.readouterr().out
    assert "initialised 2 of the model's 2 tensors" in first and "resumed from" not in first
    assert train.main([*again, "--train.max-steps", "8"], task=TASK) == 0
    second = capsys.readouterr().out
    assert "resumed from" in second and "at step 4" in second and "initialised" not in second


# ---------------------------------------------------------------- the contract at every step (issue 36)


def calls_counted(function, fails_at: int):
    """`function`, raising a ValueError at its `fails_at`-th call."""
    calls = {"n": 0}

    def counted(*args):
        calls["n"] += 1
        if calls["n"] == fails_at:
            raise ValueError("a mistake after the first calls")
        return function(*args)

    return counted


def summed_squares(cfg, model, batch):
    x, y = batch
    return {"mse": torch.nn.functional.mse_loss(model(x), y, reduction="sum"), "count": len(y)}


def test_train_step_raising_at_step_7_is_one_line_with_the_resume_command(tmp_path, capsys):
    task = mistaken(train_step=calls_counted(train_step, fails_at=7))
    assert run(tmp_path, task, "--train.max-steps", "12") == 2
    line = one_line(capsys)
    assert line.startswith("error: task tiny: train_step raised ValueError at step 7 (test_contract.py line "), line
    assert "a mistake after the first calls; its checkpoints are kept; once mended, resume with: " in line
    assert "--run-name r --resume auto" in line and (tmp_path / "r" / "checkpoints" / "step-00000004.ckpt").exists()


def test_train_step_changing_its_form_is_one_line(tmp_path, capsys):
    def changes(cfg, model, batch, step, train_size):
        loss = train_step(cfg, model, batch, step, train_size)
        return (loss, {"half": loss.detach() / 2}) if step >= 2 else loss

    assert run(tmp_path, mistaken(train_step=changes)) == 2
    line = one_line(capsys)
    assert "task tiny: train_step returned the loss alone at its first call, then (loss, ['half']) (at step 3)" in line

    def gains_a_name(cfg, model, batch, step, train_size):
        loss = train_step(cfg, model, batch, step, train_size)
        return loss, {"half": loss.detach() / 2, **({"step": step} if step else {})}

    assert run(tmp_path / "2", mistaken(train_step=gains_a_name)) == 2
    assert "train_step logged ['half'] at its first call, then (loss, ['half', 'step']) (at step 2)" in one_line(capsys)


def test_eval_step_raising_or_changing_shape_in_a_validation_is_one_line(tmp_path, capsys):
    small = ["--data.eval-batch-size", "16"]  # 4 validation batches; the dry run before training takes one
    task = mistaken(evaluate=None, eval_step=calls_counted(summed_squares, fails_at=3))
    assert run(tmp_path, task, *small) == 2
    line = one_line(capsys)
    assert line.startswith("error: task tiny: eval_step raised ValueError in the validation after step 4"), line
    assert "(test_contract.py line " in line and "no checkpoint had been written" in line  # its first validation

    calls = {"n": 0}

    def reshaped(cfg, model, batch):  # the dry run's batch, the validation's first, then a vector where a scalar was
        sums, calls["n"] = summed_squares(cfg, model, batch), calls["n"] + 1
        return {**sums, "mse": sums["mse"].reshape(1)} if calls["n"] == 3 else sums

    assert run(tmp_path / "2", mistaken(evaluate=None, eval_step=reshaped), *small) == 2
    line = one_line(capsys)
    assert "task tiny: eval_step returned sums of the shapes {'mse': (), 'count': ()} at its first batch" in line, line


def test_metric_names_without_the_val_prefix_are_one_line(tmp_path, capsys):
    assert run(tmp_path, mistaken(metrics={"mse": "min"})) == 2
    assert "Task.metrics: expected names of the form val/NAME" in one_line(capsys)


def test_a_dataset_raising_at_one_index_names_the_index(tmp_path, capsys):
    class Points(torch.utils.data.Dataset):
        def __init__(self, split):
            self.x, self.y = split.arrays

        def __len__(self):
            return len(self.x)

        def __getitem__(self, index):
            if index == 77:
                raise ValueError("a corrupt example")
            return torch.as_tensor(self.x[index]), torch.as_tensor(self.y[index])

    def datasets(cfg):
        return {split: Points(data) for split, data in TASK.datasets(cfg).items()}

    assert run(tmp_path, mistaken(datasets=datasets), "--train.max-steps", "30") == 2
    line = one_line(capsys)
    assert line.startswith("error: Points.__getitem__(77) raised ValueError at step "), line
    assert "(test_contract.py line " in line and "a corrupt example" in line


def test_a_loss_on_another_device_is_one_line(tmp_path, capsys):
    def on_meta(cfg, model, batch, step, train_size):
        return torch.zeros((), device="meta", requires_grad=True)

    assert run(tmp_path, mistaken(train_step=on_meta)) == 2
    assert "task tiny: train_step (test_contract.py): expected the loss on cpu, got meta" in one_line(capsys)


class Examples(torch.utils.data.Dataset):
    """The tiny task's points one example at a time (the per-example path), the 300th of another length if asked
    (in the training split only: 64 examples in the others)."""

    def __init__(self, split, ragged: bool = False):
        (self.x, self.y), self.ragged = split.arrays, ragged

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        x = self.x[index][:3] if self.ragged and index == 300 else self.x[index]
        return torch.as_tensor(x), torch.as_tensor(self.y[index])


def per_example(ragged: bool = False):
    return lambda cfg: {split: Examples(data, ragged) for split, data in TASK.datasets(cfg).items()}


def test_collate_and_the_trainers_own_division_are_named_as_themselves(tmp_path, capsys):
    assert run(tmp_path, mistaken(datasets=per_example(ragged=True)), "--train.max-steps", "24") == 2
    line = one_line(capsys)
    assert line.startswith("error: collating a batch (torch's default_collate) raised RuntimeError at step "), line

    def collate(examples):
        raise TypeError("not a batch I know")

    assert run(tmp_path / "2", mistaken(datasets=per_example(), collate=collate)) == 2
    assert (
        "task tiny: collate raised TypeError in the dry run of evaluate, before training (test_contract.py"
        in one_line(capsys)
    )

    def uncounted(cfg, model, batch):
        return {**summed_squares(cfg, model, batch), "count": 0}

    assert run(tmp_path / "3", mistaken(evaluate=None, eval_step=uncounted)) == 2
    assert "task tiny: eval_step: its counts add up to 0.0 over the split; expected the number" in one_line(capsys)


class Faulty(Examples):
    """Examples whose 300th raises, or kills the DataLoader worker process reading it (as the OOM killer would)."""

    def __init__(self, split, kill: bool):
        super().__init__(split)
        self.kill = kill

    def __getitem__(self, index):
        if index == 300 and self.kill and torch.utils.data.get_worker_info() is not None:  # never the test's process
            os.kill(os.getpid(), signal.SIGKILL)
        if index == 300:
            raise ValueError("a corrupt example")
        return super().__getitem__(index)


@pytest.mark.slow  # DataLoader worker processes
def test_a_fault_in_a_dataloader_worker_is_one_line(tmp_path, capsys):
    def faulty(kill: bool):
        return lambda cfg: {split: Faulty(data, kill) for split, data in TASK.datasets(cfg).items()}

    workers = ["--data.num-workers", "2", "--train.max-steps", "24"]
    assert run(tmp_path, mistaken(datasets=faulty(kill=False)), *workers) == 2
    line = one_line(capsys)
    assert "__getitem__ raised in a DataLoader worker (test_contract.py line " in line, line
    assert "ValueError: a corrupt example (at step " in line
    assert run(tmp_path / "2", mistaken(datasets=faulty(kill=True)), *workers) == 2
    line = one_line(capsys)
    assert line.startswith("error: a DataLoader worker died (") and "possibly out of memory" in line, line


# ---------------------------------------------------------------- signals at any step (issue 36)


SIGNALLING = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
import train
from tiny_task import mistaken

calls = {{"n": 0}}


def eval_step(cfg, model, batch):  # sends this process a signal at its {at_call}th call (the dry run's is the first)
    calls["n"] += 1
    if calls["n"] == {at_call}:
        os.kill(os.getpid(), signal.{signal})
    x, y = batch
    return {{"mse": torch.nn.functional.mse_loss(model(x), y, reduction="sum"), "count": len(y)}}


task = mistaken(evaluate=None, eval_step=eval_step)
args = ["--out-dir", {out!r}, "--run-name", "r", "--data.eval-batch-size", "16"]  # 4 batches an evaluation
sys.exit(train.main(args, task=task))
"""


def signalled_run(tmp_path, signum: str, at_call: int) -> subprocess.CompletedProcess:
    """The tiny task in a process of its own (a signal handler is the main thread's), signalled by its eval_step."""
    script = tmp_path / "signalled.py"
    script.write_text(
        SIGNALLING.format(root=str(ROOT), tests=str(ROOT / "tests"), at_call=at_call, signal=signum, out=str(tmp_path))
    )
    return run_python([sys.executable, str(script)], capture_output=True, text=True, env=child_env(), timeout=300)


@pytest.mark.slow  # a process of its own
def test_a_signal_during_a_validation_stops_it_and_saves_the_last_step(tmp_path):
    result = signalled_run(tmp_path, "SIGINT", at_call=3)  # the first validation's second batch
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGINT received: stopping the validation, saving the last step's checkpoint" in out
    assert "stopped at step 4 on a signal" in out and "--resume auto" in out and "test metrics" not in out
    assert torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)["progress"]["step"] == 4


@pytest.mark.slow  # a process of its own
def test_a_signal_during_the_final_test_lets_it_finish_without_promising_a_save(tmp_path):
    result = signalled_run(tmp_path, "SIGTERM", at_call=10)  # the dry run, 2 validations of 4 batches, the test's
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGTERM received: the training is done and saved; the test goes on (again: exit)" in out
    assert "next log interval" not in out and (tmp_path / "r" / "test_metrics.json").exists()


@pytest.mark.slow  # DataLoader worker processes
def test_ctrl_c_with_dataloader_workers_is_one_line_not_one_per_worker(tmp_path):
    process = started([ITEMS_TASK, "--out-dir", str(tmp_path), "--run-name", "w", "--train.max-steps", "100000"])
    for line in process.stdout:
        if line.startswith("run folder:"):
            break
    time.sleep(2)  # the workers are up
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group, workers included
    output, _ = process.communicate(timeout=120)
    assert output.count("SIGINT received") == 1, output[-3000:]
    assert "stopped at step" in output and "Traceback" not in output


def test_a_split_that_is_no_dataset_or_is_empty_is_said_so(tmp_path, capsys):
    def arrays(cfg):
        return {**TASK.datasets(cfg), "train": TASK.datasets(cfg)["train"].arrays}

    assert run(tmp_path, mistaken(datasets=arrays)) == 2
    line = one_line(capsys)
    assert "the train split is a tuple; expected a dataset (for arrays: data.ArrayDataset(x, y))" in line, line

    def empty(cfg):
        return {**TASK.datasets(cfg), "val": torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1))}

    assert run(tmp_path, mistaken(datasets=empty)) == 2
    assert "data: the val split holds no examples" in one_line(capsys)

    def no_training(cfg):
        return {**TASK.datasets(cfg), "train": torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1))}

    assert run(tmp_path, mistaken(datasets=no_training)) == 2
    assert "data: the train split holds no examples (nothing to train on)" in one_line(capsys)


def test_stream_faults_are_one_line(tmp_path, capsys):
    """A stream that raises mid-run, one of zero items, and an empty validation stream (torchdata reads them)."""
    pytest.importorskip("torchdata")
    import stream_task

    class Failing(stream_task.Records):
        def __iter__(self):
            for i, item in enumerate(super().__iter__()):
                if i == 200:
                    raise OSError("the network share went away")
                yield item

    def with_train(stream):
        return lambda cfg: {**stream_task.datasets(cfg), "train": stream}

    task = dataclasses.replace(stream_task.TASK, datasets=with_train(Failing(0, None)))
    assert train.main(["--out-dir", str(tmp_path), "--run-name", "s"], task=task) == 2
    line = one_line(capsys)
    assert line.startswith("error: reading the data (__iter__) raised OSError at step 7 (test_contract.py line "), line
    assert "the network share went away; its checkpoints are kept; once mended, resume with:" in line
    task = dataclasses.replace(stream_task.TASK, datasets=with_train(stream_task.Records(0, 0)))
    assert train.main(["--out-dir", str(tmp_path), "--run-name", "empty"], task=task) == 2
    assert "data: the training stream yielded no batch (empty, or fewer examples than a batch" in one_line(capsys)

    def empty_val(cfg):
        return {**stream_task.datasets(cfg), "val": stream_task.Records(10**6, 0)}

    task = dataclasses.replace(stream_task.TASK, datasets=empty_val)
    assert train.main(["--out-dir", str(tmp_path), "--run-name", "noval"], task=task) == 2
    assert "data: the evaluated split gave no batch (an empty dataset or stream)" in one_line(capsys)


def test_an_empty_or_malformed_jsonl_read_by_hugging_face_is_one_line(tmp_path, capsys):
    pytest.importorskip("datasets")
    import stream_task

    lines = [json.dumps({"x": [0.1, 0.2, 0.3, 0.4], "y": 1.0})] * 64
    for name, train_lines in (("empty", []), ("malformed", [*lines[:10], '{"x": [0.1, 0.2', *lines[10:]])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train.jsonl").write_text("".join(line + "\n" for line in train_lines))
        for split in ("val", "test"):
            (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
        args = ["--out-dir", str(tmp_path), "--run-name", name, "--data.source", "hf", "--data.files", str(folder)]
        assert train.main(args, task=stream_task.TASK) == 2
        if name == "empty":  # Hugging Face finds no first row as the task builds its datasets
            line = one_line(capsys)
            assert line.startswith("error: task stream: datasets (stream_task.py) raised StopIteration"), line
            assert "an iterator ended before its first item (an empty file or stream?)" in line
            continue
        line = one_line(capsys)  # the file Hugging Face was reading, the step, the row; its own log line dropped
        assert line.startswith(f"error: reading {folder / 'train.jsonl'} raised ArrowInvalid at step 1: JSON"), line
        assert "in row 10; no checkpoint had been written" in line
