"""The training loop end to end: on the tiny in-memory task where the task does not matter, on a small slice of the
bundled sample where chess's own config or pictures are part of what is tested (tiny models, CPU)."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, parse_config, run_script, tiny_args, tiny_task_args, train_losses, weights
from tiny_task import TASK as TINY

import train
from kibitz import monitor
from tasks import chess


def test_accumulation_matches_one_full_batch(tmp_path):
    # float64: Adam divides by sqrt(v), which magnifies float32 summation-order noise on tiny gradients
    common = ["--fabric.precision", "64-true", "--train.clip", "1e9", "--train.max-steps", "6"]
    common += ["--checkpoint.keep-best", "-1"]
    assert train.main(tiny_task_args(tmp_path, *common, "--run-name", "full"), task=TINY) == 0
    assert (
        train.main(tiny_task_args(tmp_path, *common, "--train.accumulate", "4", "--run-name", "micro"), task=TINY) == 0
    )
    full, micro = weights(tmp_path / "full"), weights(tmp_path / "micro")
    for name in full:
        torch.testing.assert_close(micro[name], full[name], rtol=1e-9, atol=1e-12)
    initial = torch.load(tmp_path / "full" / "checkpoints" / "step-00000004.ckpt", weights_only=True)["model"]
    assert not torch.equal(initial["weight"], full["weight"])  # training moved the weights


def test_resume_mid_epoch_is_exact(tmp_path):
    # batch 96 over 384 examples: 4 steps an epoch, so step 7 is inside the second epoch.
    args = ["--data.batch-size", "96", "--train.max-steps", "21", "--train.val-every", "7"]
    args += ["--checkpoint.keep-best", "-1", "--log.every", "1"]
    assert train.main(tiny_task_args(tmp_path, *args, "--run-name", "whole"), task=TINY) == 0
    start = tmp_path / "whole" / "checkpoints" / "step-00000007.ckpt"
    progress = torch.load(start, weights_only=True)["progress"]
    assert progress["epoch"] == 1 and progress["step_in_epoch"] > 0
    resumed_args = tiny_task_args(tmp_path, *args, "--run-name", "resumed", "--resume", str(start))
    assert train.main(resumed_args, task=TINY) == 0
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(8, 22))
    assert all(resumed[step] == whole[step] for step in resumed)  # bitwise, not approximately
    final_whole, final_resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)


def test_resume_auto_continues_the_newest_run(tmp_path):
    assert train.main(tiny_task_args(tmp_path, "--run-name", "r", "--train.max-steps", "8"), task=TINY) == 0
    assert train.main(tiny_task_args(tmp_path, "--train.max-steps", "12", "--resume", "auto"), task=TINY) == 0
    assert sorted(train_losses(tmp_path / "r")) == [4, 8, 12]  # one run folder, continued
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    assert torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)["progress"]["step"] == 12


def test_best_k_checkpoints_last_and_test_on_best(prepared, tmp_path, capsys):
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "k", "--checkpoint.keep-best", "2")) == 0
    folder = tmp_path / "k" / "checkpoints"
    assert len(list(folder.glob("step-*.ckpt"))) == 2 and (folder / "last.ckpt").exists()
    assert not list(folder.glob("*.tmp"))
    best = torch.load(folder / "last.ckpt", weights_only=True)["progress"]["best"]
    assert sorted(name for _, name in best) == sorted(p.name for p in folder.glob("step-*.ckpt"))
    assert best[0][0] <= best[1][0]  # best first (val/l1, lower is better)
    assert f"testing the best checkpoint: {best[0][1]}" in capsys.readouterr().out
    saved = json.loads((tmp_path / "k" / "config.json").read_text())
    assert saved["model"]["width"] == 32 and saved["resume"] is None
    assert torch.load(folder / "last.ckpt", weights_only=True)["config"]["model"]["width"] == 32


def test_early_stopping(tmp_path, capsys):
    # no change short of 1000 counts as an improvement: the first validation stays the best
    args = ["--train.early-stop-min-delta", "1000", "--train.early-stop-patience", "1", "--train.max-steps", "40"]
    assert train.main(tiny_task_args(tmp_path, *args, "--run-name", "es"), task=TINY) == 0
    assert "early stopping" in capsys.readouterr().out
    assert max(train_losses(tmp_path / "es")) == 8


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--optim.lr", "-1"], "optim.lr"),
        (["--schedule.warmup-steps", "500", "--train.max-steps", "100"], "schedule.warmup_steps"),
        (["--fabric.precision", "fp13"], "fabric.precision"),
        (["--log.logger", "neptune"], "log.logger"),
        (["--data.batch-size", "100", "--train.accumulate", "3"], "data.batch_size"),
        (["--fabric.strategy", "fsdp", "--fabric.accelerator", "cpu"], "fabric: You selected the FSDP strategy"),
        (["--checkpoint.sharded"], "checkpoint.sharded"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(tmp_path, capsys, flags, field):
    assert train.main(tiny_task_args(tmp_path, *flags), task=TINY) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {field}")


def test_config_file_gives_defaults_and_flags_override(prepared, tmp_path):
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "c", "--optim.lr", "0.003")) == 0
    saved = tmp_path / "c" / "config.json"
    cfg = parse_config(["chess", "--config", str(saved), "--train.max-steps", "99"])
    assert cfg.optim.lr == 0.003 and cfg.model.width == 32 and cfg.train.max_steps == 99
    assert isinstance(cfg.data.dir, Path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optim": {"learning_rate": 1}}))
    with pytest.raises(train.ConfigError, match="optim.learning_rate: unknown config field"):
        parse_config(["chess", "--config", str(bad)])


@pytest.mark.slow
def test_two_process_cpu_run_and_the_same_under_torchrun(prepared, tmp_path):
    result = run_script(
        [
            "train.py",
            *tiny_args(prepared, tmp_path, "--run-name", "ddp", "--fabric.accelerator", "cpu", "--fabric.devices", "2"),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout and "test metrics" in result.stdout
    assert sorted(train_losses(tmp_path / "ddp")) == [4, 8, 12]
    # torchrun starts the processes; the device count comes from its environment, and the run is the same
    result = run_script(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "train.py",
            *tiny_args(prepared, tmp_path, "--run-name", "torchrun", "--fabric.accelerator", "cpu"),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    assert train_losses(tmp_path / "torchrun") == train_losses(tmp_path / "ddp")
    final, expected = weights(tmp_path / "torchrun"), weights(tmp_path / "ddp")
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def mfu_per_sample_rate(run_dir: Path) -> float:
    """perf/mfu over perf/samples_per_s at the last log: FLOPs a sample / (devices x peak)."""
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["name"] in ("perf/mfu", "perf/samples_per_s")]
    last = {r["name"]: float(r["value"]) for r in rows if r["step"] == rows[-1]["step"]}
    return last["perf/mfu"] / last["perf/samples_per_s"]


@pytest.mark.slow
def test_fabric_run_launch_with_its_precision_and_mfu_per_device(prepared, tmp_path):
    """Under `fabric run --precision bf16-mixed` (our config left at its default) the peak is looked up for the
    dtype Fabric's plugin computes in, and MFU is per device: 2 processes at a global rate R log what one
    process at R/2 would, not twice it."""
    fabric_cli = str(Path(sys.executable).parent / "fabric")  # the entry point lightning-fabric installs
    peak = ["--monitor.peak-tflops", "0.5"]
    result = run_script(
        [
            "run",
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--precision",
            "bf16-mixed",
            "--main-port",
            free_port(),
            "train.py",
            *tiny_args(prepared, tmp_path, "--run-name", "cli", *peak),
        ],
        program=fabric_cli,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout and "test metrics" in result.stdout
    assert "0.5 TFLOP/s (--monitor.peak-tflops; bfloat16 matmuls)" in result.stdout
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "one", *peak)) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["fabric"]["precision"] is None  # the launcher's
    cfg = parse_config(tiny_args(prepared, tmp_path))
    batch = list(chess.CHESS.datasets(cfg)["train"][np.arange(8)])
    flops = monitor.flops_per_sample(chess.CHESS, cfg, batch, 1000, 8)
    assert mfu_per_sample_rate(tmp_path / "one") == pytest.approx(flops / 0.5e12)
    assert mfu_per_sample_rate(tmp_path / "cli") == pytest.approx(flops / 0.5e12 / 2)


def test_the_launchers_fsdp_is_built_with_one_unit_per_block(monkeypatch, capsys):
    """`fabric run --strategy fsdp` exports LT_STRATEGY=fsdp; kibitz builds FSDP itself (per-block wrap)
    and takes the name out of the environment, or Fabric would swap in its own whole-model FSDP."""
    import os

    import config
    from kibitz import distributed
    from tasks import chess

    monkeypatch.setenv("LT_CLI_USED", "1")
    monkeypatch.setenv("LT_STRATEGY", "fsdp")
    assert config.strategy_of(config.FabricConfig()) == "fsdp"
    assert config.strategy_of(config.FabricConfig(strategy="ddp")) == "ddp"  # a flag of ours still wins
    sharded = chess.ChessConfig()
    sharded.checkpoint.sharded = True
    config.check(sharded, chess.CHESS)  # sharded checkpoints need fsdp: the launcher's counts
    with pytest.raises(config.ConfigError, match="FSDP is only available on GPU"):  # this CPU-only machine
        distributed.make_fabric(config.FabricConfig(accelerator="cpu"))
    assert "LT_STRATEGY" not in os.environ
    monkeypatch.delenv("LT_CLI_USED")
    assert config.strategy_of(config.FabricConfig()) == "auto"  # not under the launcher: the variable is ignored


def test_wandb_offline_run_is_written(prepared, tmp_path):
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "w", "--log.logger", "wandb")) == 0
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))  # the folder `wandb sync` uploads
    # Read the run back with wandb's own transaction-log reader.
    result = run_script(["-m", "wandb", "leet", "inspect", str(runs[0]), "--json"], timeout=60)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    history = {int(r["history"]["step"]["num"]): r["history"]["item"] for r in records if r["type"] == "history"}
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert sorted(history) == [4, 8, 12]
    assert {"train/loss", "train/lr", "val/l1", "perf/samples_per_s"} <= set(history[4])
    assert summary["test/l1"] == json.loads((tmp_path / "w" / "test_metrics.json").read_text())["test/l1"]
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    assert config["model"]["width"] == 32
    reads_as_wandb_does(next(runs[0].glob("run-*.wandb")), records, tmp_path)


def reads_as_wandb_does(log, records: list[dict], tmp_path) -> None:
    """kibitz's own reader of a .wandb log (resume and `wandb:` checkpoints use it) finds the records wandb's does;
    a file cut anywhere, or with a damaged byte, gives the records before the cut; a link or another file is one
    line."""
    from config import ConfigError
    from kibitz.tracking.sinks import wandb_records

    ours = wandb_records(log)
    assert [r["type"] for r in ours] == [r["type"] for r in records]
    for mine, theirs in zip(ours, records):
        if mine["type"] == "history":  # wandb's reader leaves a step of 0 out
            assert mine["history"]["step"]["num"] == theirs["history"].get("step", {}).get("num", 0)
            assert mine["history"]["item"]["train/loss"] == theirs["history"]["item"]["train/loss"]
    data = log.read_bytes()
    for cut in range(7, len(data), max(1, len(data) // 40)):
        (tmp_path / "cut.wandb").write_bytes(data[:cut])
        assert ours[: len(read := wandb_records(tmp_path / "cut.wandb"))] == read  # the records before the cut
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    (tmp_path / "damaged.wandb").write_bytes(damaged)
    assert len(read := wandb_records(tmp_path / "damaged.wandb")) < len(ours) and ours[: len(read)] == read
    (tmp_path / "linked.wandb").symlink_to(log)
    (tmp_path / "other.wandb").write_bytes(b"PK\x03\x04" + data[4:])
    for name, expected in (("linked", "links are not followed"), ("other", "not a wandb log")):
        with pytest.raises(ConfigError, match=expected) as caught:
            wandb_records(tmp_path / f"{name}.wandb")
        assert "\n" not in str(caught.value) and str(tmp_path / f"{name}.wandb") in str(caught.value)


def test_tensorboard_scalars_are_readable(prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "tb", "--log.logger", "tensorboard")) == 0
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [4, 8, 12]
    assert [e.step for e in events.Scalars("val/l1")] == [4, 8, 12]
    assert (tmp_path / "tb" / "metrics.csv").exists()  # the CSV record is written beside any tracker


def test_help_documents_every_section(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # tyro wraps to the terminal; a narrow one would split the text
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--fabric.accelerator",
        "--fabric.strategy",
        "--fabric.precision",
        "--optim.lr",
        "--schedule.kind",
        "--data.batch-size",
        "--log.logger",
        "--checkpoint.keep-best",
        "--train.max-steps",
        "--train.accumulate",
        "--train.clip",
        "--resume",
    ):
        assert flag in out
    assert "Global batch per optimizer step" in out  # field docstrings become the help


def test_max_time_alone_runs_past_one_epoch_until_the_time_is_up(prepared, tmp_path, capsys):
    # ~21k positions at batch 4096: 5 steps an epoch; 0.05 minutes is many epochs of a tiny model
    args = [
        "--train.max-steps",
        "None",
        "--train.max-time",
        "0.05",
        "--schedule.kind",
        "constant",
        "--data.batch-size",
        "4096",
        "--log.every",
        "1",
        "--train.val-every",
        "1000",
    ]
    assert train.main(tiny_args(prepared, tmp_path, *args, "--run-name", "t")) == 0
    assert "max_time of 0.05 minutes reached" in capsys.readouterr().out
    assert max(train_losses(tmp_path / "t")) > 10
    assert train.main(tiny_args(prepared, tmp_path, "--train.max-steps", "None", "--train.max-time", "1")) == 2
    assert "schedule.total_steps" in capsys.readouterr().err


def test_data_on_device_trains_bitwise_like_the_memory_map(prepared, tmp_path):
    args = ["--log.every", "1", "--train.max-steps", "8"]
    assert train.main(tiny_args(prepared, tmp_path, *args, "--run-name", "mm")) == 0
    assert train.main(tiny_args(prepared, tmp_path, *args, "--run-name", "dev", "--data.on-device")) == 0
    assert train_losses(tmp_path / "mm") == train_losses(tmp_path / "dev")
    assert all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "mm").values(), weights(tmp_path / "dev").values()))


def test_each_example_once_per_epoch_across_ranks():
    import numpy as np

    import data

    for drop_last in (True, False):
        seen, counts = [], set()
        for rank in range(3):  # 334, 333 and 333 examples: for evaluation, 10 batches of 37 each, some short
            sampler = data.EpochBatches(1000, 37, True, seed=3, rank=rank, world_size=3, drop_last=drop_last)
            sampler.start_epoch(2)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            counts.add(len(batches))
            seen.extend(np.concatenate(batches).tolist())
        assert len(seen) == len(set(seen))  # never twice
        assert len(seen) == (1000 if not drop_last else 3 * (333 // 37) * 37)
        assert len(counts) == 1  # as many batches on every rank: under FSDP each forward is collective
