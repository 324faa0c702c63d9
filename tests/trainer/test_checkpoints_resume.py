"""Surviving interruptions: SIGTERM, SIGKILL, a damaged checkpoint, and fine-tuning from weights."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    LONG,
    ROOT,
    STEPS,
    assert_matches_reference,
    assert_same_as_uninterrupted,
    child_env,
    free_port,
    python_process,
    resume_and_compare,
    run_python,
    start,
    tiny_args,
    tiny_task_args,
    train_losses,
    two_processes,
    wait_for_steps,
    weights,
)
from tiny_task import TASK as TINY

import train
from kibitz import storage


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resumes_exactly(prepared, tmp_path):
    process = start(prepared, tmp_path, "term")
    wait_for_steps(tmp_path / "term", 20, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-2000:]
    assert "SIGTERM received" in output and "resume with: python train.py chess" in output
    stopped = torch.load(tmp_path / "term" / "checkpoints" / "last.ckpt", weights_only=True)["progress"]["step"]
    assert 20 <= stopped < STEPS and max(train_losses(tmp_path / "term")) == stopped
    assert train.main(tiny_args(prepared, tmp_path, *LONG, "--run-name", "term", "--resume", "auto")) == 0
    assert_same_as_uninterrupted(prepared, tmp_path, "term")


def wandb_history(run_dir: Path) -> list[tuple[int, dict]]:
    """(step, row) of every history row in every segment of a run's offline wandb run, in order,
    read with wandb's own reader: what `wandb sync` would upload."""
    from kibitz.tracking.sinks import wandb_records, wandb_segments

    return [
        (r["history"].get("step", {}).get("num", 0), r["history"]["item"])
        for log in wandb_segments([run_dir / "wandb"])
        for r in wandb_records(log)
        if r["type"] == "history"
    ]


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once(prepared, tmp_path):
    # log.every 1000: the first signal's checkpoint would wait for step 1000; the second does not wait
    process = start(
        prepared, tmp_path, "twice", "--log.every", "1000", "--train.max-steps", "100000", "--train.val-every", "100000"
    )
    for line in process.stdout:  # training has begun once the run folder is announced
        if line.startswith("run folder:"):
            break
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "SIGTERM received" in output and "SIGTERM again: exiting at once" in output


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_auto_is_exact(prepared, tmp_path):
    process = start(prepared, tmp_path, "kill", "--log.logger", "wandb")
    wait_for_steps(tmp_path / "kill", 30, process)
    process.kill()  # SIGKILL: no handler, no cleanup, possibly in the middle of a write
    process.communicate(timeout=60)
    assert (
        train.main(
            tiny_args(prepared, tmp_path, *LONG, "--run-name", "kill", "--resume", "auto", "--log.logger", "wandb")
        )
        == 0
    )
    assert_same_as_uninterrupted(prepared, tmp_path, "kill")
    # The wandb run (two segments, the first cut by the kill) holds every step once, with the losses of
    # the metrics log.
    rows = wandb_history(tmp_path / "kill")
    assert len(list((tmp_path / "kill" / "wandb").glob("offline-run-*"))) == 2
    assert [step for step, _ in rows] == list(range(1, STEPS + 1))
    assert {step: row["train/loss"] for step, row in rows} == train_losses(tmp_path / "kill")


def test_a_resumed_wandb_run_neither_repeats_nor_loses_steps(tmp_path):
    """Segments written with the real wandb: one that holds steps past the checkpoint (they are not
    logged again), and one that lost steps before it (they are replayed from metrics.csv)."""
    from kibitz.tracking import loggers

    def segment(kind: str, resume_step: int | None, steps: range) -> None:
        sinks = loggers.make_loggers(kind, tmp_path, "kibitz-test", "offline", {}, resume_step)
        for step in steps:
            sinks.log({"train/loss": 1 / step}, step)
        sinks.finish()

    segment(("wandb",), None, range(1, 51))  # wandb holds 1..50
    segment(("wandb",), 30, range(31, 61))  # resumed from a checkpoint at 30: 31..50 are in the first segment
    segment(("csv",), 60, range(61, 81))  # 61..80 reached the CSV only (as when wandb lost its last block)
    segment(("wandb",), 70, range(71, 91))  # resumed at 70: 61..70 are replayed, 71..90 logged
    rows = wandb_history(tmp_path)
    assert [step for step, _ in rows] == list(range(1, 91))
    assert all(row["train/loss"] == 1 / step for step, row in rows)


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    args = ["--run-name", "d", "--checkpoint.keep-best", "-1"]
    assert train.main(tiny_task_args(tmp_path, *args), task=TINY) == 0
    last = tmp_path / "d" / "checkpoints" / "last.ckpt"
    damaged = last.with_name("damaged")
    damaged.write_bytes(last.read_bytes()[:1000])  # a new file: step-00000012.ckpt stays intact
    os.replace(damaged, last)
    capsys.readouterr()
    assert train.main(tiny_task_args(tmp_path, *args, "--train.max-steps", "16", "--resume", "auto"), task=TINY) == 0
    out = capsys.readouterr().out
    assert f"warning: {last}: cannot load checkpoint" in out
    assert "resumed from" in out and "step-00000012.ckpt at step 12" in out


@pytest.mark.slow
def test_a_checkpoint_folder_missing_a_shard_falls_back_to_the_previous_one(prepared, tmp_path, capsys):
    args = [
        "--run-name",
        "f",
        "--checkpoint.keep-best",
        "-1",
        "--fabric.accelerator",
        "cpu",
        "--fabric.devices",
        "1",
        "--fabric.strategy",
        "fsdp2",
        "--checkpoint.sharded",
    ]
    from conftest import run_script

    result = run_script(["train.py", *tiny_args(prepared, tmp_path, *args)])
    assert result.returncode == 0, result.stderr[-3000:]
    last = tmp_path / "f" / "checkpoints" / "last.ckpt"
    next(last.glob("*.distcp")).unlink()  # last.ckpt's own link: step-00000012.ckpt/ stays whole
    result = run_script(
        ["train.py", *tiny_args(prepared, tmp_path, *args, "--train.max-steps", "16", "--resume", "auto")]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: {last}: cannot load checkpoint (ValueError: damaged" in result.stdout  # its checksums tell
    assert "step-00000012.ckpt at step 12" in result.stdout


def test_init_from_takes_the_weights_only(tmp_path, capsys):
    assert train.main(tiny_task_args(tmp_path, "--run-name", "base"), task=TINY) == 0
    source = tmp_path / "base" / "checkpoints" / "last.ckpt"
    # a learning rate too small to move anything: the new run ends where the source ended
    args = ["--run-name", "tuned", "--init-from", str(source), "--optim.lr", "1e-30", "--schedule.kind", "constant"]
    assert train.main(tiny_task_args(tmp_path, *args), task=TINY) == 0
    assert "initialised 2 of the model's 2 tensors from" in capsys.readouterr().out
    assert sorted(train_losses(tmp_path / "tuned")) == [4, 8, 12]  # a new run: its own steps from 0
    tuned, base = weights(tmp_path / "tuned"), weights(tmp_path / "base")
    assert all(torch.equal(tuned[k], base[k]) for k in base)
    state = torch.load(tmp_path / "tuned" / "checkpoints" / "last.ckpt", weights_only=True)["optimizer"]
    assert all(s["step"].item() == 12 for s in state["state"].values())  # a fresh optimizer, 12 steps old


@pytest.mark.slow
def test_two_process_sigkill_then_resume_is_exact_and_survives_a_world_size_change(
    prepared, tmp_path, reference, capsys
):
    """FSDP2 (fully_shard per layer through ModelParallelStrategy, on CPU with gloo) with folders of shards, killed
    at once; the reference writes files: the checkpoint form does not touch training. (DDP and FSDP2 with whole
    files: the SIGTERM test below; a DDP run killed with SIGKILL: tests/trainer/test_data_items.py.)"""
    import shutil

    from conftest import run_script

    flags = [*two_processes("fsdp2"), "--checkpoint.sharded"]
    process = start(prepared, tmp_path, "k2", *flags)
    wait_for_steps(tmp_path / "k2", 40, process)
    os.killpg(process.pid, signal.SIGKILL)  # both ranks at once, as when a node is lost
    process.communicate(timeout=60)
    shutil.copytree(tmp_path / "k2", tmp_path / "k1")  # the same interrupted run, to resume on one process
    reference_dir = reference(*two_processes("fsdp2"))
    resume_and_compare(prepared, tmp_path, "k2", reference_dir, *flags)
    resumes_on_one_process(prepared, tmp_path, "k1", reference_dir, True, capsys)

    # a folder also loads whole into one process without FSDP: the evaluate tool reads it
    from kibitz import tools
    from tasks import TASKS

    folder = tmp_path / "k2" / "checkpoints" / f"step-{STEPS:08d}.ckpt"
    assert (folder / "meta.pt").exists() and len(list(folder.glob("*.distcp"))) == 2
    metrics = tools.evaluate(tools.EvaluateArgs(folder, split="val"), TASKS["chess"])
    logged = val_metrics(tmp_path / "k2")[STEPS]
    assert abs(metrics["l1"] - logged["val/l1"]) < 1e-5
    # exported as one file (the documented command): the same checkpoint, with its config and progress
    export = ["train.py", "export-checkpoint", "--ckpt", str(folder), "--out", str(tmp_path / "one.ckpt")]
    assert run_script(export).returncode == 0
    whole = torch.load(tmp_path / "one.ckpt", weights_only=True)
    assert whole["progress"]["step"] == STEPS and whole["config"]["task"] == "chess" and "optimizer" in whole
    assert tools.evaluate(tools.EvaluateArgs(tmp_path / "one.ckpt", split="val"), TASKS["chess"]) == metrics
    init = ["--init-from", str(tmp_path / "one.ckpt"), "--train.max-steps", "4", "--train.val-every", "2"]
    result = run_script(["train.py", *tiny_args(prepared, tmp_path, *LONG, *init, "--run-name", "tuned")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"initialised (\d+) of the model's \1 tensors", result.stdout), result.stdout[-2000:]


def resumes_on_one_process(prepared, tmp_path, name: str, reference_dir: Path, sharded: bool, capsys) -> None:
    """2 processes, then 1: a whole-state checkpoint loads into an unsharded model, a folder of shards into one
    FSDP2 process (resharded). The same global batch (each holds the same positions), so the run goes on where it
    stopped, its losses close to the 2-process ones."""
    one_process = ["--fabric.strategy", "fsdp2", "--checkpoint.sharded"] if sharded else []
    capsys.readouterr()
    assert train.main(tiny_args(prepared, tmp_path, *LONG, *one_process, "--run-name", name, "--resume", "auto")) == 0
    assert "micro-batch 512 x 1 accumulation x 1 = 512" in capsys.readouterr().out
    one, two = train_losses(tmp_path / name), train_losses(reference_dir)
    assert sorted(one) == list(range(1, STEPS + 1))
    for step in (
        STEPS - 1,
        STEPS,
    ):  # far past the switch; data.flip draws differ per process count, hence the tolerance
        assert abs(one[step] - two[step]) < 0.05 * two[step], (step, one[step], two[step])


def val_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    import csv

    rows: dict[int, dict[str, float]] = {}
    with open(run_dir / "metrics.csv") as f:
        for r in csv.DictReader(f):
            if r["name"].startswith("val/"):
                rows.setdefault(int(r["step"]), {})[r["name"]] = float(r["value"])
    return rows


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_checkpoint_and_resume(prepared, tmp_path):
    fabric_cli = str(Path(sys.executable).parent / "fabric")
    port = free_port()  # for the rendezvous
    env = child_env()

    def both_nodes(*extra: str) -> list[str]:
        processes = [
            python_process(
                [
                    fabric_cli,
                    "run",
                    "--accelerator",
                    "cpu",
                    "--devices",
                    "1",
                    "--num-nodes",
                    "2",
                    "--node-rank",
                    str(rank),
                    "--main-address",
                    "127.0.0.1",
                    "--main-port",
                    port,
                    "train.py",
                    *tiny_args(prepared, tmp_path, "--run-name", "nodes", *extra),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in (0, 1)
        ]
        outputs = [p.communicate(timeout=240)[0] for p in processes]
        assert [p.returncode for p in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
        return outputs

    first = both_nodes()
    assert "2 processes" in first[0] and "test metrics" in first[0]
    assert (tmp_path / "nodes" / "checkpoints" / "last.ckpt").exists()
    second = both_nodes("--train.max-steps", "16", "--resume", "auto")
    assert "resumed from" in second[0] and "at step 12" in second[0]
    assert sorted(train_losses(tmp_path / "nodes")) == [4, 8, 12, 16]


def test_a_checkpoint_write_failure_stops_the_run_and_keeps_the_previous_one(prepared, tmp_path):
    import resource

    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "cw", "--train.max-steps", "4")) == 0

    def small_disk():  # a real write failure: files may not grow past 50 kB (EFBIG), a checkpoint is ~300 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    result = run_python(
        [
            sys.executable,
            "train.py",
            *tiny_args(prepared, tmp_path, "--run-name", "cw", "--resume", "auto", "--train.max-steps", "12"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
        timeout=300,
        env=child_env(),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: cannot write checkpoint" in result.stderr and "step-00000008.ckpt (" in result.stderr
    assert "are intact" in result.stderr
    last = torch.load(tmp_path / "cw" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["progress"]["step"] == 4  # the previous checkpoint, whole
    assert not (tmp_path / "cw" / "checkpoints" / "step-00000008.ckpt").exists()


def test_logger_failures_are_reported_once_and_training_continues(tmp_path, capsys, monkeypatch):
    # metrics.csv on a full disk (/dev/full: every write fails with ENOSPC), and wandb unable to start
    # (its folder's path is taken by a file)
    run_dir = tmp_path / "lf"
    run_dir.mkdir()
    full = open("/dev/full", "a")  # the file metrics.csv is opened as (a link in the run folder is refused)
    opened = storage.open_in_place  # the CSV sink imports it where it opens the file
    monkeypatch.setattr(
        storage, "open_in_place", lambda path, mode: full if path.name == "metrics.csv" else opened(path, mode)
    )
    (run_dir / "wandb").write_text("not a folder")
    assert train.main(tiny_task_args(tmp_path, "--run-name", "lf", "--log.logger", "wandb"), task=TINY) == 0
    out = capsys.readouterr().out
    assert out.count("warning: logger CSVLog failed") == 1 and "No space left on device" in out
    assert out.count("warning: the wandb logger could not start") == 1
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["progress"]["step"] == 12
    assert "test metrics" in out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_sigterm_saves_together_and_resumes_exactly(prepared, tmp_path, reference, strategy, capsys):
    """Whole checkpoint files; resumed on 2 processes exactly, and on 1 (a world size change)."""
    import shutil

    process = start(prepared, tmp_path, "t2", *two_processes(strategy))
    wait_for_steps(tmp_path / "t2", 30, process)
    os.killpg(process.pid, signal.SIGTERM)  # every rank gets it, as under SLURM's preemption
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "resume with: python train.py chess" in output
    saved = torch.load(tmp_path / "t2" / "checkpoints" / "last.ckpt", weights_only=True)
    stopped = saved["progress"]["step"]
    assert 30 <= stopped < STEPS and max(train_losses(tmp_path / "t2")) == stopped
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])  # each rank its own stream
    shutil.copytree(tmp_path / "t2", tmp_path / "t1")  # the same stopped run, to resume on one process
    reference_dir = reference(*two_processes(strategy))
    resume_and_compare(prepared, tmp_path, "t2", reference_dir, *two_processes(strategy))
    resumes_on_one_process(prepared, tmp_path, "t1", reference_dir, False, capsys)


def test_resume_and_init_from_a_wandb_model_artifact(prepared, tmp_path, capsys):
    """Offline: the artifact is found through the run's wandb records, fetched into out/artifacts/, and
    continues its run exactly; the artifact folder alone (as on another machine) continues it too."""
    import shutil

    artifacts = ["--log.logger", "wandb", "--log.checkpoint-artifacts", "--checkpoint.keep-best", "-1"]
    assert train.main(tiny_args(prepared, tmp_path, *artifacts, "--run-name", "a")) == 0
    run_id = (tmp_path / "a" / "wandb_id.txt").read_text()
    shutil.rmtree(tmp_path / "a" / "checkpoints")  # the local checkpoints are gone; the artifacts remain
    capsys.readouterr()
    # from step 8 to the run's end (step 12) again: the same weights as a run never interrupted
    assert train.main(tiny_args(prepared, tmp_path, *artifacts, "--resume", f"wandb:model-{run_id}:step-8")) == 0
    assert "at step 8" in capsys.readouterr().out
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "reference")) == 0
    assert_matches_reference_weights(tmp_path / "a", tmp_path / "reference")
    assert sorted(train_losses(tmp_path / "a")) == [4, 8, 12]
    assert [step for step, _ in wandb_history(tmp_path / "a")] == [4, 8, 12]  # once each, across segments

    # The fetched artifact folder, used elsewhere: the run it records continues, in the same wandb run.
    folder = tmp_path / "artifacts" / f"model-{run_id}-step-8"
    assert (folder / "model.ckpt").is_file()
    elsewhere = tmp_path / "elsewhere"
    assert train.main(tiny_args(prepared, elsewhere, "--resume", str(folder))) == 0
    assert (elsewhere / "a" / "wandb_id.txt").read_text() == run_id
    assert_matches_reference_weights(elsewhere / "a", tmp_path / "reference")

    # --init-from an alias: the weights of the best checkpoint, a new run from step 0
    assert (
        train.main(
            tiny_args(
                prepared,
                tmp_path,
                "--run-name",
                "tuned",
                "--optim.lr",
                "1e-30",
                "--schedule.kind",
                "constant",
                "--init-from",
                f"wandb:model-{run_id}:best",
            )
        )
        == 0
    )
    best = torch.load(tmp_path / "artifacts" / f"model-{run_id}-best" / "model.ckpt", weights_only=True)
    assert_matches_reference_weights(tmp_path / "tuned", best["model"])
    assert sorted(train_losses(tmp_path / "tuned")) == [4, 8, 12]


def assert_matches_reference_weights(run_dir: Path, expected) -> None:
    final = weights(run_dir)
    expected = expected if isinstance(expected, dict) else weights(expected)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_srun_launch_sigusr1_saves_and_resumes_exactly(prepared, tmp_path, reference):
    """Two tasks started the way `srun --ntasks-per-node=2` starts them: each process gets SLURM's
    variables and Fabric's SLURM environment takes its rank from them (SLURM itself is not installed
    here, so the variables are set by the test). SIGUSR1, SLURM's warning before preemption, reaches
    every task: they save together, exit 0, and a second srun continues bitwise exactly."""
    port = free_port()
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "kibitz",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": port,
    }
    flags = [*two_processes("ddp"), "--run-name", "s"]

    def srun(*extra: str) -> list[subprocess.Popen]:
        return [
            python_process(
                [sys.executable, "train.py", *tiny_args(prepared, tmp_path, *LONG, *flags, *extra)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=child_env(**slurm, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
            )
            for rank in (0, 1)
        ]

    tasks = srun()
    wait_for_steps(tmp_path / "s", 30, tasks[0])
    for task in tasks:
        task.send_signal(signal.SIGUSR1)
    outputs = [task.communicate(timeout=120)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "SIGUSR1 received" in outputs[0] and "resume with: python train.py chess" in outputs[0]
    stopped = torch.load(tmp_path / "s" / "checkpoints" / "last.ckpt", weights_only=True)["progress"]["step"]
    assert 30 <= stopped < STEPS
    tasks = srun("--resume", "auto")
    outputs = [task.communicate(timeout=300)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert f"at step {stopped}" in outputs[0] and "2 processes" in outputs[0]
    assert_matches_reference(tmp_path / "s", reference(*two_processes("ddp")))  # the same run as --fabric.devices 2


@pytest.mark.slow
def test_fsdp2_accumulation_with_and_without_skipping_the_gradient_sync_agree(prepared, tmp_path):
    """Under FSDP2 the sync is not skipped by default (skipping keeps whole gradients until the last
    micro-batch); both ways give the same training, up to float summation order."""
    from conftest import run_script

    common = [*two_processes("fsdp2"), "--train.accumulate", "2", "--train.max-steps", "8", "--data.no-flip"]
    for name, flags in (("synced", []), ("skipped", ["--train.skip-grad-sync", "True"])):
        result = run_script(["train.py", *tiny_args(prepared, tmp_path, *common, *flags, "--run-name", name)])
        assert result.returncode == 0, result.stderr[-3000:]
    # float32 (ModelParallelStrategy has no 64-bit mode): Adam magnifies summation-order noise on small
    # gradients to ~2e-5 here; a lost or doubled micro-batch would move weights by ~1e-3 a step
    synced, skipped = weights(tmp_path / "synced"), weights(tmp_path / "skipped")
    assert all(torch.allclose(synced[k], skipped[k], rtol=0, atol=1e-4) for k in synced)
    assert train_losses(tmp_path / "synced") == pytest.approx(train_losses(tmp_path / "skipped"), rel=1e-5)


def test_the_fp16_grad_scaler_state_is_checkpointed(tmp_path):
    """fp16 needs a GPU through the config; Fabric's fp16 precision plugin with torch's CPU GradScaler
    is the same object, so its state is checked here."""
    from lightning_fabric import Fabric
    from lightning_fabric.plugins.precision import MixedPrecision

    from kibitz import checkpoints
    from tasks import TASKS
    from tasks.chess import ChessConfig

    def fp16_run(scale: float) -> train.Run:
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
        cfg = ChessConfig()
        cfg.model.width, cfg.model.depth = 8, 1
        model = fabric.setup_module(TASKS["chess"].build_model(cfg))
        optimizer = fabric.setup_optimizers(train.make_optimizer(model, cfg.optim, fused=False))
        return train.Run(
            fabric,
            cfg,
            TASKS["chess"],
            model,
            optimizer,
            tmp_path,
            train_loader=None,
            eval_loaders={},
            datasets={},
            total_steps=10,
            steps_per_epoch=10,
            lr_at=None,
            params=[],
            param_names=[],
            sharded=False,
            rank_by=("val/l1", "min"),
            resume_command="",
            progress=checkpoints.Progress(),
            window=train.LogWindow(torch.zeros(1), torch.zeros(1), torch.empty(1, 0)),
        )

    saved = fp16_run(2.0**10)
    scaler = saved.fabric.strategy.precision.scaler
    scaler.scale(torch.ones(()))  # the first scaled loss creates the scale
    scaler.update(new_scale=123.0)  # as after overflows had lowered it
    checkpoints.save(saved, tmp_path / "checkpoints" / "last.ckpt")
    resumed = fp16_run(2.0**16)
    checkpoints.restore(resumed, None)
    assert resumed.fabric.strategy.precision.scaler.get_scale() == 123.0


def test_a_bad_resume_source_is_a_one_line_error(tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        (str(tmp_path / "missing.ckpt"), "no such checkpoint file or folder"),
        (str(garbage), "cannot load checkpoint"),
        ("wandb:model-nothere:best", "not found offline"),
    ]
    for source, expected in cases:
        assert train.main(tiny_task_args(tmp_path, "--resume", source), task=TINY) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: resume: ") and expected in err and err.count("\n") == 1, err


def test_resume_continues_the_run_as_configured_and_refuses_a_change_of_what_it_trains_on(prepared, tmp_path, capsys):
    args = ["--run-name", "r", "--optim.lr", "0.003", "--train.max-steps", "8"]
    assert train.main(tiny_task_args(tmp_path, *args), task=TINY) == 0
    capsys.readouterr()
    again = tiny_task_args(tmp_path, "--run-name", "r", "--resume", "auto", "--train.max-steps", "12")
    assert train.main(again, task=TINY) == 0  # no --optim.lr: the run's own 0.003, not the default
    out = capsys.readouterr().out
    assert f"resuming {tmp_path / 'r'} as configured (config.json); the flags change train.max_steps 8 -> 12" in out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["optim"]["lr"] == 0.003
    assert sorted(train_losses(tmp_path / "r")) == [4, 8, 12]
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "c", "--train.max-steps", "4")) == 0
    capsys.readouterr()
    wider = tiny_args(prepared, tmp_path, "--run-name", "c", "--resume", "auto", "--model.width", "64")
    assert train.main(wider) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: resume: --model.width changes what the run in {tmp_path / 'c'} trains on (32 -> 64)")
    assert "\n" not in err
