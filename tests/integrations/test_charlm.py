"""examples/charlm.py: a task in one file that is not chess gets the trainer's features without touching it."""

import json
import os
import signal
import time

import pytest
import torch
from conftest import run_script, started, steps_so_far, train_losses, weights

SMALL = [
    "--model.width",
    "32",
    "--model.depth",
    "1",
    "--model.heads",
    "2",
    "--data.context",
    "32",
    "--data.batch-size",
    "32",
    "--schedule.warmup-steps",
    "5",
    "--log.no-progress-bar",
    "--log.no-pictures",
]


def charlm(out, *extra: str) -> list[str]:
    return ["examples/charlm.py", *SMALL, "--out-dir", str(out), *extra]


@pytest.mark.slow  # starts processes of its own
def test_smoke_run_learns_checkpoints_and_evaluates(tmp_path, capsys):
    result = run_script(
        charlm(
            tmp_path,
            "--run-name",
            "s",
            "--train.max-steps",
            "60",
            "--train.val-every",
            "30",
            "--log.every",
            "10",
            "--log.logger",
            "tensorboard",
            "--monitor.histogram-every",
            "20",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bits per char" in result.stdout and "file unigram entropy" in result.stdout
    losses = train_losses(tmp_path / "s")
    assert losses[60] < losses[10] < 5.6  # from ln(256) = 5.5 nats down
    tested = json.loads((tmp_path / "s" / "test_metrics.json").read_text())
    assert tested["test/bpc"] == pytest.approx(tested["test/loss"] / 0.6931471805599453)
    names = (tmp_path / "s" / "metrics.csv").read_text()
    for name in ("val/bpc", "grad_norm/total", "update_ratio/blocks.0.qkv.weight", "perf/tokens_per_s"):
        assert name in names, name
    assert list((tmp_path / "s").glob("events.out.tfevents.*")) or list((tmp_path / "s").rglob("*tfevents*"))
    # evaluate from the generic entry point: the checkpoint names its task file, which runs only when named
    ckpt = tmp_path / "s" / "checkpoints" / "last.ckpt"
    import train  # in this process: a process each would cost seconds of imports

    assert train.main(["evaluate", "--ckpt", str(ckpt), "--split", "val", "--accelerator", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "only when you name it" in err and "examples/charlm.py evaluate --ckpt" in err
    assert train.main(["examples/charlm.py", "evaluate", "--ckpt", str(ckpt), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "val metrics of" in out and "bits per char" in out


@pytest.mark.slow
def test_two_process_ddp_and_lr_find(tmp_path):
    result = run_script(
        charlm(
            tmp_path,
            "--run-name",
            "ddp",
            "--train.max-steps",
            "20",
            "--train.val-every",
            "10",
            "--log.every",
            "5",
            "--log.logger",
            "csv",
            "--fabric.accelerator",
            "cpu",
            "--fabric.devices",
            "2",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout and "bits per char" in result.stdout
    result = run_script(
        [
            "examples/charlm.py",
            "lr-find",
            *SMALL,
            "--out-dir",
            str(tmp_path),
            "--steps",
            "40",
            "--fabric.accelerator",
            "cpu",
            "--fabric.devices",
            "2",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    suggestion = float(result.stdout.split("suggested lr: ")[1].split()[0])
    assert 1e-6 <= suggestion < 1
    assert (next(tmp_path.glob("lr-find-*")) / "lr_find.png").exists()


@pytest.mark.slow
def test_sigkill_then_resume_auto_is_bitwise_the_uninterrupted_run(tmp_path, capsys):
    long = [
        "--train.max-steps",
        "80",
        "--train.val-every",
        "40",
        "--log.every",
        "1",
        "--checkpoint.every",
        "9",
        "--log.logger",
        "csv",
    ]
    import train  # the uninterrupted and the resumed run in this process: a fresh one would spend seconds on imports

    assert train.main(charlm(tmp_path, *long, "--run-name", "whole")) == 0
    process = started(charlm(tmp_path, *long, "--run-name", "killed"))
    run_dir = tmp_path / "killed"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if steps_so_far(run_dir) >= 25:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stdout.read()[-3000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert len(train_losses(run_dir)) < 80
    capsys.readouterr()
    assert train.main(charlm(tmp_path, *long, "--run-name", "killed", "--resume", "auto")) == 0
    assert "resumed from" in capsys.readouterr().out
    whole, after = train_losses(tmp_path / "whole"), train_losses(run_dir)
    assert sorted(after) == list(range(1, 81)) and all(after[s] == whole[s] for s in whole)
    final, expected = weights(run_dir), weights(tmp_path / "whole")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
