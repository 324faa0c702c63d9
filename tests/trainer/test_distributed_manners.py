"""kibitz as a library and as a batch job: it leaves its caller as it found it, writes logs a file can hold, and
takes weights and validation budgets from elsewhere."""

import csv
import json
import os
import re
import signal
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import dvae_args, run_script, tiny_args

import train
from kibitz import distributed


def test_an_in_process_run_leaves_signal_handlers_and_warning_filters_as_it_found_them(prepared, tmp_path, monkeypatch):
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "base", "--train.max-steps", "4")) == 0
    folder = tmp_path / "weights.ckpt"  # weights as a folder of shards: reading it silences a torch warning
    state = torch.load(tmp_path / "base" / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, checkpoint_id=folder)

    def mine(signum, frame):  # a notebook's own handler
        pass

    signal.signal(signal.SIGTERM, mine)
    try:
        filters = list(warnings.filters)
        monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # the caller's own: the run's seeding sets 1337 there
        monkeypatch.delenv("MASTER_PORT", raising=False)
        environment = {name: os.environ.get(name) for name in distributed.RENDEZVOUS}
        assert train.main(tiny_args(prepared, tmp_path, "--train.max-steps", "4", "--init-from", str(folder))) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        assert warnings.filters == filters
        assert {name: os.environ.get(name) for name in distributed.RENDEZVOUS} == environment  # the seed Fabric sets
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.slow  # starts processes of its own
def test_off_a_terminal_the_progress_bar_is_drawn_once_per_log_interval(prepared, tmp_path):
    args = tiny_args(prepared, tmp_path, "--train.max-steps", "200", "--log.every", "50", "--train.val-every", "100")
    args.remove("--log.no-progress-bar")
    result = run_script(["train.py", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    draws = [piece for piece in re.split(r"[\r\n]", result.stderr) if re.search(r"\d+/200 \[", piece)]
    assert 4 <= len(draws) <= 4 + 2, draws  # each log, plus the bar's first and last drawing


def test_val_batches_caps_validation(prepared, tmp_path):
    args = ["--run-name", "capped", "--train.val-batches", "2", "--data.eval-batch-size", "100"]
    assert train.main(tiny_args(prepared, tmp_path, *args)) == 0
    with open(tmp_path / "capped" / "metrics.csv") as f:
        counted = {float(r["value"]) for r in csv.DictReader(f) if r["name"] == "val/positions"}
    assert counted == {200.0}  # the same first 200 positions at every validation
    assert train.main(tiny_args(prepared, tmp_path, "--train.val-batches", "0")) == 2


def test_wandb_stages_a_runs_artifacts_inside_its_folder(prepared, tmp_path, monkeypatch):
    home_data = tmp_path / "xdg"  # where wandb would stage them otherwise (~/.local/share/wandb)
    monkeypatch.setenv("XDG_DATA_HOME", str(home_data))
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    args = ["--run-name", "staged", "--log.logger", "wandb", "--log.checkpoint-artifacts", "--log.pictures"]
    assert train.main(tiny_args(prepared, tmp_path, *args)) == 0
    staged = [f for f in (tmp_path / "staged" / "wandb" / "data").rglob("*") if f.is_file()]
    assert staged and sum(f.stat().st_size for f in staged) > 100_000  # the checkpoints' copies
    assert not [f for f in home_data.rglob("*") if f.is_file() and "staging" in str(f)]
    pictures = list((tmp_path / "staged" / "wandb").rglob("media/images/test/predictions_*.png"))
    assert len(pictures) == 1 and not list(home_data.rglob("*.png"))  # the test picture, logged inside the folder
    assert "WANDB_DATA_DIR" not in os.environ


def opens_as_a_picture(path: Path) -> None:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0  # drawn, not blank


def test_every_run_folder_gets_its_curves_and_the_tasks_pictures(prepared, tmp_path):
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "none", "--log.no-pictures")) == 0
    assert not list((tmp_path / "none").glob("*.png")) and not (tmp_path / "none" / "test_error_by_eval.json").exists()
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "pic", "--log.pictures")) == 0  # the default
    opens_as_a_picture(tmp_path / "pic" / "curves.png")
    opens_as_a_picture(tmp_path / "pic" / "test_predictions.png")
    buckets = json.loads((tmp_path / "pic" / "test_error_by_eval.json").read_text())
    test = json.loads((tmp_path / "pic" / "test_metrics.json").read_text())
    assert sum(b["positions"] for b in buckets) == test["test/positions"]  # a small split: every position
    assert [b["abs_eval"] for b in buckets][:2] == ["0-0.5", "0.5-1"] and buckets[-1]["abs_eval"].startswith("15")
    weighted = sum(b["l1"] * b["positions"] for b in buckets if b["positions"]) / test["test/positions"]
    assert weighted == pytest.approx(test["test/l1"], rel=1e-4)  # the same predictions as the test metrics


def test_dvae_reconstructions_and_hparams_reach_tensorboard(prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    args = ["--run-name", "tb", "--log.logger", "tensorboard", "--log.pictures"]
    assert train.main(dvae_args(prepared, tmp_path, *args)) == 0
    opens_as_a_picture(tmp_path / "tb" / "test_reconstructions.png")
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert "test/reconstructions" in events.Tags()["images"]
    image = events.Images("test/reconstructions")[-1]
    assert image.step == 40 and image.width > 200
    hparams = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert {"optim.lr", "model.latents", "dvae.quantizer", "data.dir"} <= {h.name for h in experiment.hparam_infos}
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"test/token_acc", "test/board_acc", "test/recon_loss"} <= metrics
    session = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["model.latents"].number_value == 8
    tested = json.loads((tmp_path / "tb" / "test_metrics.json").read_text())
    assert events.Scalars("test/token_acc")[-1].value == pytest.approx(tested["test/token_acc"])


def test_a_rank_forked_before_its_handlers_keeps_an_interrupt_for_them():
    """The forking process's SIGINT stops its wait (a KeyboardInterrupt, as Python's own handler gives); a rank
    forked from it that meets the SIGINT before setting its own handlers keeps it for them, and stops with the other
    ranks instead of leaving alone (which left them waiting for it)."""
    from types import SimpleNamespace

    callers = signal.getsignal(signal.SIGINT)
    with distributed.caller_state_kept():
        distributed.keep_early_interrupts()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 1)  # the handler runs once the signal is delivered
        pid = os.fork()
        if pid == 0:  # the rank
            code = 1
            try:
                os.kill(os.getpid(), signal.SIGINT)  # before its own handlers: kept
                run = SimpleNamespace(stop_signal=None, fabric=SimpleNamespace(global_rank=1), phase="train")
                distributed.stop_on_signals(run)  # takes it
                code = 0 if run.stop_signal == signal.SIGINT and not distributed.EARLY_SIGNALS else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert signal.getsignal(signal.SIGINT) is callers  # the caller's handler is back
