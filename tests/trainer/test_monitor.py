"""Monitoring read back with the real tools: numpy, wandb's reader, TensorBoard's EventAccumulator."""

import csv
import json
import re

import numpy as np
import pytest
import torch
from conftest import run_script, tiny_args, train_losses

import train
from kibitz import monitor
from model import ChessEvaluator
from tasks import chess


def test_histogram_counts_match_numpy():
    torch.manual_seed(0)
    tensors = [torch.randn(300, 200), torch.rand(1000) * 5 - 1, torch.full((7,), 0.5), torch.randn(10, 3) * 1e-4]
    stats = monitor.tensor_stats(tensors, bins=64, moments=True)
    assert torch.isnan(monitor.tensor_stats(tensors, bins=64)[:, 2:5]).all()  # moments only when asked
    for tensor, row in zip(tensors, stats):
        values = tensor.reshape(-1).double().numpy()
        if values.min() == values.max():
            assert row[5] == len(values)  # a constant tensor: everything in the first bin
            continue
        counts, _ = np.histogram(values, bins=64, range=(values.min(), values.max()))
        assert np.array_equal(row[5:].numpy().astype(np.int64), counts)
        assert row[0].item() == pytest.approx(values.min()) and row[1].item() == pytest.approx(values.max())
        assert row[2].item() == pytest.approx(values.mean(), abs=1e-6)
        assert row[3].item() == pytest.approx(values.std(), rel=1e-4)
        assert row[4].item() == pytest.approx(np.linalg.norm(values), rel=1e-5)


def test_sampling_caps_the_elements_histogrammed():
    stats = monitor.tensor_stats([torch.randn(10_000)], bins=8, max_elements=1000)
    assert stats[0, 5:].sum().item() == 1000


HIST = ["--monitor.histogram-every", "4"]
NAMES = ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]


def test_wandb_history_holds_histograms_and_norms(prepared, tmp_path):
    assert train.main(tiny_args(prepared, tmp_path, *HIST, "--run-name", "w", "--log.logger", "wandb")) == 0
    run = next((tmp_path / "w" / "wandb").glob("offline-run-*"))
    result = run_script(["-m", "wandb", "leet", "inspect", str(run), "--json"])
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    history: dict[int, dict] = {}
    for r in records:
        if r["type"] == "history":
            history.setdefault(int(r["history"]["step"]["num"]), {}).update(r["history"]["item"])
    for step in (4, 8, 12):
        for name in NAMES:
            for prefix in ("gradients", "parameters"):
                key = f"{prefix}/{name}"  # wandb's reader flattens a histogram into key._type, .bins, .values
                row = {field: history[step][f"{key}.{field}"] for field in ("_type", "bins", "values")}
                row = {k: json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v for k, v in row.items()}
                assert row["_type"] == "histogram" and len(row["bins"]) == 65 and sum(row["values"]) > 0
        assert history[step]["grad_norm/total"] > 0 and "update_ratio/layers.0.weight" in history[step]
    assert not any(k.startswith("gradients/") for s in history if s % 4 for k in history[s])  # only every 4


def test_tensorboard_sees_the_histograms(prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train.main(tiny_args(prepared, tmp_path, *HIST, "--run-name", "tb", "--log.logger", "tensorboard")) == 0
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    for name in NAMES:
        assert [e.step for e in events.Histograms(f"gradients/{name}")] == [4, 8, 12]
        assert [e.step for e in events.Histograms(f"parameters/{name}")] == [4, 8, 12]
    weight = events.Histograms("parameters/layers.0.weight")[0].histogram_value
    assert weight.num == 808 * 32 and len(weight.bucket) == 64


def test_histograms_go_out_at_the_first_log_after_each_multiple(tmp_path):
    """Histograms are taken at a log (the loop calls the monitoring only on a step that logs): with log.every 3 and
    histogram_every 4 they go out at steps 6, 9 and 12, the first logs after 4, 8 and 12."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tiny_task import TASK

    args = ["--out-dir", str(tmp_path), "--run-name", "h", "--log.logger", "tensorboard", "--log.every", "3"]
    assert train.main([*args, "--monitor.histogram-every", "4", "--train.max-steps", "12"], task=TASK) == 0
    events = EventAccumulator(str(tmp_path / "h" / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    assert [e.step for e in events.Histograms("gradients/weight")] == [6, 9, 12]


def plant_nan(monkeypatch, at_backward: int) -> None:
    """Make the gradient of layers.2.weight NaN on one backward pass of a real training run."""

    class Planted(ChessEvaluator):
        def __init__(self, *args):
            super().__init__(*args)
            calls = {"n": 0}

            def poison(grad):
                calls["n"] += 1
                return grad * float("nan") if calls["n"] == at_backward else grad

            self.layers[2].weight.register_hook(poison)

    monkeypatch.setattr(chess, "ChessEvaluator", Planted)


def test_nonfinite_warn_names_the_layer(prepared, tmp_path, monkeypatch, capsys):
    plant_nan(monkeypatch, at_backward=3)
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "warn", "--train.max-steps", "8")) == 0
    out = capsys.readouterr().out
    assert "warning: step 3: the gradient of layers.2.weight is not finite" in out


def test_nonfinite_skip_drops_only_that_step(prepared, tmp_path, monkeypatch, capsys):
    plant_nan(monkeypatch, at_backward=3)
    args = ["--monitor.on-nonfinite", "skip", "--train.max-steps", "8", "--log.every", "1"]
    assert train.main(tiny_args(prepared, tmp_path, *args, "--run-name", "skip")) == 0
    assert "step 3: the gradient of layers.2.weight is not finite; skipping this step" in capsys.readouterr().out
    losses = train_losses(tmp_path / "skip")
    assert all(np.isfinite(v) for v in losses.values()) and sorted(losses) == list(range(1, 9))
    weights = torch.load(tmp_path / "skip" / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_stop_saves_and_exits(prepared, tmp_path, monkeypatch, capsys):
    plant_nan(monkeypatch, at_backward=3)
    args = ["--monitor.on-nonfinite", "stop", "--train.max-steps", "8"]
    assert train.main(tiny_args(prepared, tmp_path, *args, "--run-name", "stop")) == 2
    assert "step 3: the gradient of layers.2.weight is not finite; stopped" in capsys.readouterr().err
    assert (tmp_path / "stop" / "checkpoints" / "nonfinite-step-00000004.ckpt").exists()


@pytest.mark.slow
def test_two_processes_log_each_tensor_once(prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = tiny_args(
        prepared,
        tmp_path,
        *HIST,
        "--run-name",
        "ddp",
        "--log.logger",
        "tensorboard",
        "--fabric.accelerator",
        "cpu",
        "--fabric.devices",
        "2",
    )
    result = run_script(["train.py", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "ddp" / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    tags = events.Tags()["histograms"]
    assert sorted(tags) == sorted(f"{p}/{n}" for p in ("gradients", "parameters") for n in NAMES)
    for tag in tags:
        assert [e.step for e in events.Histograms(tag)] == [4, 8, 12]  # once per step, not once per rank
    assert len(list((tmp_path / "ddp" / "tensorboard").glob("events.*"))) == 1


def test_wandb_prediction_tables_and_checkpoint_artifacts(prepared, tmp_path):
    args = ["--run-name", "a", "--log.logger", "wandb", "--log.checkpoint-artifacts", "--checkpoint.keep-best", "1"]
    assert train.main(tiny_args(prepared, tmp_path, *args)) == 0
    run = next((tmp_path / "a" / "wandb").glob("offline-run-*"))
    result = run_script(["-m", "wandb", "leet", "inspect", str(run), "--json"])
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    tables = {
        int(r["history"]["step"]["num"]): r["history"]["item"]
        for r in records
        if r["type"] == "history" and "val/predictions._type" in r["history"]["item"]
    }
    assert sorted(tables) == [4, 8, 12]
    assert all(t["val/predictions._type"] == "table-file" and t["val/predictions.nrows"] == 16 for t in tables.values())
    models = [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "model"]
    assert len(models) == 3  # one per validation checkpoint
    assert all({"last", f"step-{s}"} <= set(m["aliases"]) for m, s in zip(models, (4, 8, 12)))
    with open(tmp_path / "a" / "metrics.csv") as f:
        val = {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "val/l1"}
    for model, step in zip(models, (4, 8, 12)):  # "best" exactly when it was the best so far
        assert ("best" in model["aliases"]) == (val[step] == min(v for s, v in val.items() if s <= step))


@pytest.mark.slow
def test_fsdp2_histograms_from_shards_match_ddp(prepared, tmp_path):
    """Under FSDP2 every rank holds a shard: ranges and counts are combined over ranks. The histograms
    equal those of a DDP run of the same model and data (up to float rounding at bin edges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    histograms = {}
    for strategy in ("ddp", "fsdp2"):
        # Evaluation in batches of 291: 583 and 582 val positions per rank, so rank 1 ends on an empty
        # batch; it must still take part, since each FSDP2 forward is a collective (a rank one batch
        # short made the other wait for ever).
        args = tiny_args(
            prepared,
            tmp_path,
            *HIST,
            "--run-name",
            strategy,
            "--log.logger",
            "tensorboard",
            "--fabric.accelerator",
            "cpu",
            "--fabric.devices",
            "2",
            "--fabric.strategy",
            strategy,
            "--data.eval-batch-size",
            "291",
        )
        result = run_script(["train.py", *args])
        assert result.returncode == 0, result.stderr[-3000:]
        events = EventAccumulator(str(tmp_path / strategy / "tensorboard"), size_guidance={"histograms": 0})
        events.Reload()
        histograms[strategy] = {
            (tag, e.step): e.histogram_value for tag in events.Tags()["histograms"] for e in events.Histograms(tag)
        }
    assert histograms["fsdp2"].keys() == histograms["ddp"].keys() and len(histograms["ddp"]) == 3 * 2 * len(NAMES)
    for key, ddp in histograms["ddp"].items():
        fsdp = histograms["fsdp2"][key]
        assert fsdp.num == ddp.num and fsdp.min == pytest.approx(ddp.min, rel=1e-4, abs=1e-7), key
        assert fsdp.max == pytest.approx(ddp.max, rel=1e-4, abs=1e-7), key
        moved = sum(abs(a - b) for a, b in zip(fsdp.bucket, ddp.bucket))
        assert moved <= 0.01 * ddp.num + 2, (key, moved)
    val = {}
    for strategy in ("ddp", "fsdp2"):
        with open(tmp_path / strategy / "metrics.csv") as f:
            val[strategy] = {
                (r["step"], r["name"]): float(r["value"]) for r in csv.DictReader(f) if r["name"].startswith("val/")
            }
    assert len(val["ddp"]) >= 3 and val["fsdp2"] == pytest.approx(val["ddp"], rel=1e-4)  # reduced over both ranks


def test_a_nonfinite_loss_with_zero_gradients_is_caught(prepared, tmp_path, capsys):
    """lr 1e20: the outputs go NaN, ReLU gives their gradients 0, and only the loss tells."""
    args = ["--optim.lr", "1e20", "--train.max-steps", "8", "--log.every", "2"]
    assert train.main(tiny_args(prepared, tmp_path, *args, "--run-name", "stop", "--monitor.on-nonfinite", "stop")) == 2
    assert "the training loss is not finite; stopped" in capsys.readouterr().err
    assert train.main(tiny_args(prepared, tmp_path, *args, "--run-name", "warn")) == 0
    assert "warning: steps 1-2: the training loss is not finite" in capsys.readouterr().out
    assert train.main(tiny_args(prepared, tmp_path, *args, "--run-name", "skip", "--monitor.on-nonfinite", "skip")) == 0
    assert "the training loss is not finite; skipping this step" in capsys.readouterr().out
    saved = list((tmp_path / "skip" / "checkpoints").glob("*.ckpt"))
    assert saved and all(
        torch.isfinite(w).all() for f in saved for w in torch.load(f, weights_only=True)["model"].values()
    )


def test_skip_never_lets_a_nonfinite_weight_into_a_checkpoint(prepared, tmp_path, monkeypatch, capsys):
    class Overflowing(ChessEvaluator):  # a weight turns inf on the 6th forward pass, as an overflowing update would
        def __init__(self, *args):
            super().__init__(*args)
            calls = {"n": 0}

            def overflow(module, inputs):
                calls["n"] += module.training
                if calls["n"] == 6 and module.training:
                    with torch.no_grad():
                        module.layers[0].weight[0, 0] = float("inf")

            self.register_forward_pre_hook(overflow)

    monkeypatch.setattr(chess, "ChessEvaluator", Overflowing)
    args = ["--monitor.on-nonfinite", "skip", "--train.max-steps", "8", "--run-name", "skip"]
    assert train.main(tiny_args(prepared, tmp_path, *args)) == 2
    assert re.search("layers.0.weight not finite.*last checkpoint holds the last finite", capsys.readouterr().err)
    saved = list((tmp_path / "skip" / "checkpoints").glob("*.ckpt"))
    assert [f.name for f in saved if f.name.startswith("step-")] == ["step-00000004.ckpt"]
    assert all(torch.isfinite(w).all() for f in saved for w in torch.load(f, weights_only=True)["model"].values())
