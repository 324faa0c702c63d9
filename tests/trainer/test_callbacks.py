"""The trainer's own behaviour on the tiny task, in-process: hooks observe (a read-only view, a stop request, their
values logged), the final test loads the best checkpoint strictly, and the typed run state is what a checkpoint
holds."""

import csv
import dataclasses
import warnings

import pytest
import torch
from tiny_task import TASK, TinyConfig, mistaken

import callbacks
import train
from kibitz import checkpoints, storage


def config(tmp_path, **train_fields) -> TinyConfig:
    cfg = TinyConfig(out_dir=tmp_path, run_name="r")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_fields))


def logged(run_dir, name: str) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == name}


def test_a_hook_sees_the_run_read_only_and_may_only_ask_to_stop(tmp_path, capsys):
    seen = {}

    def after_step(run) -> None:
        seen.setdefault("steps", []).append(run.step)
        for field, value in (("should_stop", True), ("lr", 1.0), ("step", 0)):
            with pytest.raises(AttributeError, match="a hook observes: it cannot set run"):
                setattr(run, field, value)
        with pytest.raises(TypeError):  # the row is the loop's
            run.log_row["train/loss"] = 0.0
        progress = run.progress
        progress.step = 10**6  # a copy: the loop's own is untouched
        if run.step == 3:
            run.request_stop()

    task = mistaken(hooks=lambda cfg, datasets: {"after_step": [after_step]})
    trained = train.train(config(tmp_path, max_steps=8), task)
    assert trained.run_dir == tmp_path / "r" and set(trained.metrics) == {"mse"}  # what the caller gets back
    trained.show()  # outside a notebook: the pictures' paths
    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path / "r" / "curves.png")
    assert seen["steps"] == [1, 2, 3]  # stopped after the step that asked
    saved = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["progress"]["step"] == 3 and set(saved["progress"]) == {
        f.name for f in dataclasses.fields(checkpoints.Progress)
    }
    assert set(saved["window"]) == {"sums", "steps"}


def test_values_a_hook_returns_are_logged_at_any_point(tmp_path):
    def at_validation(run) -> dict:
        return {"val/twice_mse": 2 * run.val_metrics["val/mse"]}

    def at_log(run) -> dict:
        return {"train/loss_plus_one": run.log_row["train/loss"] + 1}

    task = mistaken(hooks=lambda cfg, datasets: {"on_validation_end": [at_validation], "on_log": [at_log]})
    train.train(config(tmp_path), task)
    mse, twice = logged(tmp_path / "r", "val/mse"), logged(tmp_path / "r", "val/twice_mse")
    assert sorted(twice) == sorted(mse) == [4, 8] and all(twice[s] == pytest.approx(2 * mse[s]) for s in mse)
    loss, plus_one = logged(tmp_path / "r", "train/loss"), logged(tmp_path / "r", "train/loss_plus_one")
    assert sorted(plus_one) == sorted(loss) and all(plus_one[s] == pytest.approx(loss[s] + 1) for s in loss)


def test_a_hook_that_sets_a_field_is_one_line_naming_it(tmp_path, capsys):
    def sets_the_learning_rate(run) -> None:
        run.lr = 0.0

    task = mistaken(hooks=lambda cfg, datasets: {"after_backward": [sets_the_learning_rate]})
    assert train.main(["--out-dir", str(tmp_path), "--run-name", "r"], task=task) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: hook test_a_hook_that_sets_a_field_is_one_line_naming_it.<locals>.sets_the_")
    assert "at after_backward raised AttributeError (test_callbacks.py line " in err and "cannot set run.lr" in err


def test_a_misspelt_hook_point_is_refused():
    with pytest.raises(train.ConfigError, match="'after_stpe' is not a point the loop calls"):
        callbacks.merge({"after_stpe": [print]})


def test_the_final_test_refuses_a_best_checkpoint_that_does_not_fit_the_model(tmp_path):
    cfg = config(tmp_path)
    train.config.check(cfg, TASK)
    with train.distributed.caller_state_kept():  # setup installs the run's signal handlers
        fabric = train.distributed.make_fabric(cfg.fabric)
        fabric.launch()
        run = train.setup(fabric, cfg, TASK, "python train.py")
        try:
            train.fit(run, {})
            run.model = run.fabric.setup_module(torch.nn.Linear(4, 3))  # not the model the checkpoints hold
            with pytest.raises(SystemExit, match=r"^error: .*step-\d+\.ckpt: cannot test it \(RuntimeError: "):
                train.test(run)
        finally:
            train.runs.unlock_folder(run.folder_lock)


def test_reading_a_folder_of_shards_leaves_the_warning_filters_as_they_were(tmp_path):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own save warns the same way
        dcp.save({"model": {"weight": torch.arange(4.0)}}, checkpoint_id=tmp_path / "shards")
    torch.save({"progress": {}}, tmp_path / "shards" / "meta.pt")
    before = list(warnings.filters)
    folder = tmp_path / "shards"
    state = checkpoints.whole_state(folder, ["weight"], storage.verify(folder))
    assert torch.equal(state["weight"], torch.arange(4.0))
    assert warnings.filters == before


def test_evaluate_looks_for_a_wandb_checkpoint_under_the_out_dir_given(tmp_path, capsys):
    assert train.main(["evaluate", "--ckpt", "wandb:model-none:best", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"not found offline in the runs under {tmp_path}" in err, err


def test_a_config_saved_before_the_rename_of_checkpoint_monitor_still_reads():
    from kibitz import configfile

    cfg = configfile.from_dict(TinyConfig, {"checkpoint": {"monitor": "val/mse", "keep_best": 3}})
    assert cfg.checkpoint.rank_by == "val/mse" and cfg.checkpoint.keep_best == 3


def test_the_commit_of_the_code_is_in_config_json_and_every_checkpoint(tmp_path):
    import json
    import subprocess

    from conftest import ROOT

    from kibitz import configfile

    train.train(config(tmp_path), TASK)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    code = json.loads((tmp_path / "r" / "config.json").read_text())["code"]
    assert code["commit"] == head.strip() and isinstance(code["dirty"], bool)
    checkpoints_written = list((tmp_path / "r" / "checkpoints").glob("*.ckpt"))
    assert checkpoints_written and all(torch.load(p, weights_only=True)["code"] == code for p in checkpoints_written)
    again = configfile.load_json(tmp_path / "r" / "config.json", TinyConfig, "tiny")  # --config reads past it
    assert again.train == config(tmp_path).train
