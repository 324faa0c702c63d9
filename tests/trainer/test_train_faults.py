"""Faults in a training run and bad inputs to it: every one ends every rank with one line, never a traceback
or a hang."""

import csv
import dataclasses
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, child_env, parse_config, python_process, tiny_args, tiny_task_args
from tiny_task import TASK as TINY

import chessdata.cli
import chessdata.folder
import chessdata.pgn
import chessdata.prepare
import train
from kibitz import storage

TWO_DDP = ["--fabric.accelerator", "cpu", "--fabric.devices", "2", "--fabric.strategy", "ddp"]


def small_disk():  # a real write failure: files may not grow past 50 kB (EFBIG), a checkpoint is ~300 kB
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True])
def test_a_failed_checkpoint_write_stops_every_rank_of_a_two_process_run(prepared, tmp_path, sharded):
    strategy = ["--fabric.strategy", "fsdp2", "--checkpoint.sharded"] if sharded else []
    args = tiny_args(prepared, tmp_path, "--run-name", "full", *TWO_DDP, *strategy)
    started = time.monotonic()
    process = python_process(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=small_disk,
        env=child_env(),
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError("the run hung after a failed checkpoint write") from None
    assert time.monotonic() - started < 60  # start-up, 4 steps, the failed save and every rank gone
    assert process.returncode == 2
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert errors and all(e.startswith("error: cannot write checkpoint") for e in errors), stderr[-3000:]
    assert "step-00000004.ckpt" in errors[0] and "File too large" in errors[0]
    assert len(errors) == (2 if sharded else 1)  # each rank that failed says so; under DDP rank 0 alone writes
    assert not (tmp_path / "full" / "checkpoints" / "last.ckpt").exists()


def one_error(capsys) -> str:
    """The run's stderr holds exactly one error line and no traceback; that line."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def cut_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def shorten(path):
    np.save(path, np.load(path)[:-5])


def empty(folder):
    for f in folder.glob("*.npy"):
        np.save(f, np.load(f)[:0])


DAMAGES = {
    "missing split file": (lambda d: (d / "val" / "cp.npy").unlink(), "val/cp.npy: missing"),
    "truncated meta.json": (lambda d: cut_half(d / "meta.json"), "meta.json: not valid JSON"),
    "truncated .npy": (lambda d: cut_half(d / "train" / "positions.npy"), "positions.npy: cannot be read"),
    "mismatched lengths": (lambda d: shorten(d / "train" / "cp.npy"), "train: the arrays' lengths differ"),
    "empty val split": (lambda d: empty(d / "val"), "the val split holds no examples"),
    "empty test split": (lambda d: empty(d / "test"), "the test split holds no examples"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_data_folder_is_one_line(prepared, tmp_path, capsys, damage):
    folder = tmp_path / "data"
    shutil.copytree(prepared, folder)
    do, expected = DAMAGES[damage]
    do(folder)
    assert train.main(tiny_args(folder, tmp_path)) == 2
    assert expected in one_error(capsys)


def test_bad_sqlite_and_jsonl_sources_are_one_line_or_counted(tmp_path, capsys):
    (tmp_path / "noise.db").write_bytes(np.random.default_rng(0).bytes(8192))
    with pytest.raises(SystemExit) as exit_:
        chessdata.cli.main(["prepare", str(tmp_path / "noise.db"), "--out", str(tmp_path / "a")])
    assert exit_.value.code == 2 and "noise.db: cannot be read as an SQLite database" in one_error(capsys)

    start = "rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w KQkq -"
    with sqlite3.connect(tmp_path / "quoted.db") as db:  # a table name SQL must quote, quotes and all
        db.execute('CREATE TABLE "my ""evals""" (fen TEXT, eval REAL)')
        db.execute('INSERT INTO "my ""evals""" VALUES (?, 0.3)', (start,))
    chessdata.cli.main(["prepare", str(tmp_path / "quoted.db"), "--out", str(tmp_path / "b")])
    assert "1 positions from 1 records" in capsys.readouterr().out

    record = {"evals": [{"pvs": [{"cp": 3}], "depth": 1}]}
    lines = [{**record, "fen": 5}, {**record, "fen": ["x"]}, {**record, "fen": start}]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    chessdata.cli.main(["prepare", str(tmp_path / "e.jsonl"), "--out", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert "1 positions from 1 records" in out and "'bad_json': 2" in out


@pytest.fixture(scope="module")
def base_run(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    assert train.main(tiny_args(prepared, out, "--run-name", "base", "--train.max-steps", "4")) == 0
    return out / "base" / "checkpoints" / "last.ckpt"


def test_init_from_loads_what_fits_and_says_how_much(prepared, tmp_path, capsys, base_run):
    args = ["--train.max-steps", "4", "--model.width", "64", "--init-from", str(base_run)]
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "wide", *args)) == 0
    out = capsys.readouterr().out
    assert "initialised 1 of the model's 4 tensors" in out and "3 of another shape kept as initialised" in out

    plain = tmp_path / "plain.pt"  # weights from another project: a bare state_dict
    torch.save(torch.load(base_run, weights_only=True)["model"], plain)
    args = ["--optim.lr", "1e-30", "--schedule.kind", "constant", "--train.max-steps", "4", "--init-from", str(plain)]
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "plain", *args)) == 0
    assert "initialised 4 of the model's 4 tensors" in capsys.readouterr().out
    tuned = torch.load(tmp_path / "plain" / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    base = torch.load(base_run, weights_only=True)["model"]
    assert all(torch.equal(tuned[k], base[k]) for k in base)


def test_checkpoints_that_fit_nothing_are_one_line(prepared, tmp_path, capsys, base_run):
    (tmp_path / "noise.ckpt").write_bytes(np.random.default_rng(0).bytes(10_000))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save({"model": {"encoder.weight": torch.zeros(3)}, "progress": {}}, tmp_path / "other-task.ckpt")
    cases = {
        ("--init-from", "noise.ckpt"): "not a file torch.save wrote",
        ("--init-from", "foreign.pt"): "none of its 1 tensors fits the model's 4",
        ("--init-from", "other-task.ckpt"): "none of its 1 tensors fits the model's 4",
        ("--resume", "noise.ckpt"): "not a file torch.save wrote",
        ("--resume", "foreign.pt"): "not a kibitz checkpoint: no model, optimizer, progress entry",
    }
    for (flag, name), expected in cases.items():
        assert train.main(tiny_args(prepared, tmp_path, flag, str(tmp_path / name))) == 2, (flag, name)
        assert expected in one_error(capsys), (flag, name)


def test_a_rotten_checkpoint_falls_back_like_a_truncated_one(tmp_path, capsys):
    args = ["--run-name", "rot", "--train.max-steps", "8", "--checkpoint.keep-best", "-1"]
    assert train.main(tiny_task_args(tmp_path, *args), task=TINY) == 0
    last = tmp_path / "rot" / "checkpoints" / "last.ckpt"
    rotten = bytearray(last.read_bytes())  # a flipped bit, the file still loads: only the checksum tells
    rotten[len(rotten) // 2] ^= 0x10
    os.unlink(last)  # a hard link of step 8's file: replace, do not write through
    last.write_bytes(rotten)
    assert train.main(tiny_task_args(tmp_path, "--resume", str(last)), task=TINY) == 2
    assert "damaged" in one_error(capsys)
    leftover = last.with_name("step-00000012.ckpt.tmp")  # what a save killed midway leaves
    leftover.write_bytes(b"partial")
    os.unlink(last.with_name("step-00000008.ckpt"))
    assert (
        train.main(tiny_task_args(tmp_path, *args[:2], "--train.max-steps", "12", "--resume", "auto"), task=TINY) == 0
    )
    out = capsys.readouterr().out
    assert "last.ckpt: cannot load checkpoint (ValueError: damaged" in out and "at step 4" in out
    assert not leftover.exists()


def test_a_rotten_shard_folder_fails_its_checksum(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step.ckpt"
    dcp.save({"model": {"w": torch.randn(1000)}}, checkpoint_id=folder)
    (folder / storage.CHECKSUMS).write_text(json.dumps(storage.folder_checksums(folder)))
    storage.verify(folder)
    shard = next(folder.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(data)
    with pytest.raises(ValueError, match=f"damaged: {shard.name} does not match its checksum"):
        storage.verify(folder)


@pytest.mark.parametrize("tail", ["\n\n", "\0" * 64, "12,train/lo"])
def test_a_torn_metrics_csv_does_not_block_resume(tmp_path, capsys, tail):
    # what a crash or a power loss leaves at the end of the file: a blank line, zeroed blocks, half a row
    args = ["--run-name", "torn", "--train.max-steps", "8"]
    assert train.main(tiny_task_args(tmp_path, *args), task=TINY) == 0
    with open(tmp_path / "torn" / "metrics.csv", "a") as f:
        f.write(tail)
    assert (
        train.main(tiny_task_args(tmp_path, *args[:2], "--train.max-steps", "12", "--resume", "auto"), task=TINY) == 0
    )
    rows = list(csv.reader(open(tmp_path / "torn" / "metrics.csv")))
    assert rows[0] == ["step", "name", "value"] and all(len(row) == 3 and "\0" not in row[2] for row in rows)
    assert sorted({int(row[0]) for row in rows[1:] if row[1] == "train/loss"}) == [4, 8, 12]


def test_metrics_csv_is_read_only_from_a_file_of_its_own(tmp_path):
    """A metrics.csv that is a link (to a run's real one), a FIFO, a device or a folder gives no rows, at once: the
    sweep's trials and its restored ASHA read run folders too, and links in them are never followed."""
    from kibitz.tracking.sinks import metric_rows

    real = tmp_path / "metrics.csv"
    real.write_text("step,name,value\n10,val/bpc,2.5\n")
    assert metric_rows(real) == [["10", "val/bpc", "2.5"]]
    (tmp_path / "link.csv").symlink_to(real)
    os.mkfifo(tmp_path / "fifo.csv")  # no writer: an ordinary open would wait for one forever
    (tmp_path / "folder.csv").mkdir()
    for path in ("link.csv", "fifo.csv", "folder.csv", "missing.csv", "/dev/zero"):
        assert metric_rows(tmp_path / path) == [], path


def written_to_a_full_disk(path: Path, text) -> None:
    """A run folder's file written where every write fails as on a full disk: /dev/full answers ENOSPC."""
    with open("/dev/full", "wb") as full:
        full.write(text.encode() if isinstance(text, str) else text)


def test_other_bad_arguments_and_a_full_disk_are_one_line(prepared, tmp_path, capsys, monkeypatch):
    args = tiny_args(prepared, tmp_path)
    assert train.main([args[0], "lr-find", *args[1:], "--steps", "0"]) == 2
    assert "steps: expected at least 2 steps" in one_error(capsys)
    monkeypatch.setattr(storage, "write_atomic", written_to_a_full_disk)  # config.json: ENOSPC
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "full")) == 2
    assert "cannot write the run folder" in (line := one_error(capsys)) and "No space left on device" in line


@pytest.mark.slow
def test_a_run_that_prepares_its_data_equals_one_that_finds_it_prepared(tmp_path):
    """Same seed, same data: bitwise the same weights, whether the process prepared the data itself (its memory
    and threads used by prepare first), waited on the lock while another run prepared it (the case once seen to
    differ), or found the folder ready; the three train side by side with torch's default thread count, more
    threads than the machine has cores."""
    flags = ["--model.width", "128", "--train.max-steps", "40", "--log.every", "1", "--train.val-every", "20"]
    env = {k: v for k, v in child_env().items() if k != "OMP_NUM_THREADS"}

    def start(data_dir: Path, name: str, sources: str) -> subprocess.Popen:
        args = tiny_args(data_dir, tmp_path, *flags, "--run-name", name)
        args[args.index("--data.sources") + 1] = sources
        command = [sys.executable, "train.py", *args]
        return python_process(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    capped = tmp_path / "300.pgn"  # the games `prepared` holds, as a source of their own
    games = [game for _, game in zip(range(300), chessdata.pgn.iter_games(chessdata.folder.SAMPLE_PGN))]
    capped.write_text("".join(games))
    chessdata.prepare.prepare([capped], tmp_path / "ready")
    names = ("ready", "fresh", "waiter")
    runs = [start(tmp_path / ("ready" if n == "ready" else "shared"), n, str(capped)) for n in names]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stderr[-3000:]
    assert ["prepared " in stdout for stdout, _ in outputs] in ([False, True, False], [False, False, True])
    saved = [torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=True)["model"] for n in names]
    for other in saved[1:]:
        assert other.keys() == saved[0].keys()
        assert all(torch.equal(saved[0][k], other[k]) for k in saved[0])


def test_what_preparing_the_data_draws_does_not_change_the_run(prepared, tmp_path):
    """A task's prepare_data may draw random numbers (a random split, a shuffle) in the process that prepares,
    and not in one that finds the data ready: the weights are seeded after the data, so both runs are the same."""
    import random

    from tasks import TASKS

    def draw(cfg) -> None:
        torch.rand(7), np.random.rand(7), random.random()

    weights = {}
    for name, prepare in (("draws", draw), ("ready", None)):
        task = dataclasses.replace(TASKS["chess"], prepare_data=prepare)
        cfg = parse_config(tiny_args(prepared, tmp_path, "--run-name", name))
        train.train(cfg, task)
        weights[name] = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(weights["draws"][k], weights["ready"][k]) for k in weights["ready"])


def test_saves_never_stage_in_tmpdir(tmp_path, monkeypatch):
    """Fabric's own save stages each checkpoint in $TMPDIR (a kill leaves it there, a full $TMPDIR fails the
    save); kibitz writes beside the checkpoint: with no usable temporary folder at all, the run still saves."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    assert train.main(tiny_task_args(tmp_path, "--run-name", "direct"), task=TINY) == 0
    saved = torch.load(tmp_path / "direct" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["progress"]["step"] == 12
