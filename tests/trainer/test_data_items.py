"""A per-example Dataset (dict examples, random augmentation in 2 worker processes) trains, and resumes bitwise after
kill -9 at a random step, in one process and under 2-process DDP, and with another number of workers."""

from pathlib import Path

import pytest
import torch
from conftest import DDP, ITEMS_TASK, kill_at_a_random_step, run_script, train_losses, weights


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory) -> Path:
    """The uninterrupted run, 2 worker processes (the task's default), one training process."""
    out = tmp_path_factory.mktemp("items")
    reference = run_script([ITEMS_TASK, "--out-dir", str(out), "--run-name", "reference"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "test metrics (items)" in reference.stdout
    return out / "reference"


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    assert train_losses(run_dir) == train_losses(reference_dir)  # every step, bitwise
    final, expected = weights(run_dir), weights(reference_dir)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], DDP], ids=["one process", "ddp"])
def test_per_example_data_with_workers_resumes_exactly_after_kill_9(tmp_path, flags, request):
    if flags:
        reference = run_script([ITEMS_TASK, "--out-dir", str(tmp_path), "--run-name", "reference", *flags])
        assert reference.returncode == 0, reference.stderr[-3000:]
    reference_dir = tmp_path / "reference" if flags else request.getfixturevalue("one_process_reference")
    kill_at_a_random_step(tmp_path, "killed", *flags)
    assert len(train_losses(tmp_path / "killed")) < 40  # it was interrupted
    resumed = run_script([ITEMS_TASK, "--out-dir", str(tmp_path), "--run-name", "killed", "--resume", "auto", *flags])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "killed", reference_dir)


@pytest.mark.slow  # two DataLoader worker processes
def test_the_augmentation_does_not_depend_on_the_number_of_workers(tmp_path, one_process_reference):
    result = run_script([ITEMS_TASK, "--out-dir", str(tmp_path), "--run-name", "none", "--data.num-workers", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / "none", one_process_reference)  # 0 workers against 2
    losses = list(train_losses(tmp_path / "none").values())
    assert losses[-1] < losses[0] / 2  # it learns


@pytest.mark.slow
def test_fsdp2_shards_a_task_without_blocks_saves_resumes_and_exports(tmp_path, capsys):
    fsdp2 = [*DDP[:-1], "fsdp2", "--checkpoint.sharded", "--data.num-workers", "0"]
    reference = run_script([ITEMS_TASK, "--out-dir", str(tmp_path), "--run-name", "reference", *fsdp2])
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "fsdp2: the task names no blocks, so the whole model is one unit" in reference.stdout
    kill_at_a_random_step(tmp_path, "killed", *fsdp2)
    resumed = run_script([ITEMS_TASK, "--out-dir", str(tmp_path), "--run-name", "killed", "--resume", "auto", *fsdp2])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "reference")
    final, expected = weights(tmp_path / "killed"), weights(tmp_path / "reference")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    folder, whole = tmp_path / "killed" / "checkpoints" / "last.ckpt", tmp_path / "whole.ckpt"
    assert folder.is_dir()
    import train  # one process each: in this one (a fresh one would spend seconds on imports)

    assert train.main(["export-checkpoint", "--ckpt", str(folder), "--out", str(whole)]) == 0
    assert train.main([ITEMS_TASK, "evaluate", "--ckpt", str(whole), "--split", "val"]) == 0
    assert "val metrics of" in capsys.readouterr().out
