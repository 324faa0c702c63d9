"""Streams (IterableDatasets) resume exactly: kill -9 at a random step, then --resume auto, gives the uninterrupted run
bitwise, for a stream with its own state_dict and for Hugging Face `datasets` streaming local JSONL files; alone and
under 2-process DDP. A stream that cannot say where it is, asked to resume, is one line."""

import json

import numpy as np
import pytest
import torch
from conftest import DDP, ROOT, kill_at_a_random_step, run_train, train_losses, weights

TASK = str(ROOT / "tests" / "stream_task.py")


def jsonl_files(folder):
    rng = np.random.default_rng(0)
    for split, count in (("train", 1500), ("val", 128), ("test", 128)):
        x = rng.normal(size=(count, 4))
        y = x @ np.array([1.0, -2.0, 0.5, 3.0])
        lines = [json.dumps({"x": row.tolist(), "y": float(target)}) for row, target in zip(x, y)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "source, flags",
    [("records", []), ("hf", []), ("hf", DDP)],
    ids=["stream", "hf datasets", "hf datasets ddp"],
)
def test_a_stream_resumes_exactly_after_kill_9(tmp_path, source, flags):
    streams = ["--data.source", source, "--data.files", str(jsonl_files(tmp_path)), *flags]
    run_train([TASK, "--out-dir", str(tmp_path), "--run-name", "reference", *streams])  # one process: in this one
    losses = train_losses(tmp_path / "reference")
    assert sorted(losses) == list(range(1, 41)) and losses[40] < losses[1] / 3  # it learns
    kill_at_a_random_step(tmp_path, "killed", *streams, task=TASK)
    assert len(train_losses(tmp_path / "killed")) < 40
    run_train([TASK, "--out-dir", str(tmp_path), "--run-name", "killed", "--resume", "auto", *streams])
    assert train_losses(tmp_path / "killed") == losses
    final, expected = weights(tmp_path / "killed"), weights(tmp_path / "reference")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    tested = json.loads((tmp_path / "killed" / "test_metrics.json").read_text())
    assert tested["test/count"] == 128  # every rank's part of the test stream, once


def test_a_stream_that_cannot_say_where_it_is_is_refused_on_resume_in_one_line(tmp_path, capsys):
    import train

    args = [TASK, "--out-dir", str(tmp_path), "--run-name", "f", "--data.source", "forgetful"]
    assert train.main([*args, "--train.max-steps", "10"]) == 0  # trains; saving needs no state
    capsys.readouterr()
    assert train.main([*args, "--train.max-steps", "20", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if "error" in line] == [
        "error: resume: the training stream (Forgetful) has no state_dict/load_state_dict, so a resumed run cannot "
        "continue where the checkpoint was taken (it would read the stream again from its start); give the dataset "
        "those two methods, or start a new run"
    ]
    assert train.main([TASK, "--out-dir", str(tmp_path), "--train.max-epochs", "2"]) == 2
    assert "train.max_epochs: a stream has no epochs" in capsys.readouterr().err
