"""examples/sweep.py: a Ray Tune search over a task's config, each trial an ordinary kibitz run with its run folder
and its MLflow run; ASHA stops bad trials early; an interrupted sweep restores and finishes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, parse_config, run_script, started, train_losses

pytest.importorskip("ray.tune")  # the .[sweep] extra (the test extra installs it)
mlflow = pytest.importorskip("mlflow")

TRIAL = [
    "--model.depth",
    "1",
    "--data.context",
    "32",
    "--schedule.warmup-steps",
    "2",
    "--train.max-steps",
    "200",
    "--train.val-every",
    "10",
    "--log.every",
    "5",
    "--log.no-pictures",
]
STEPS = 200  # long enough that a trial ASHA stops at one of its first validations is still running when the stop
# reaches it (Tune's decision and the trial's poll of metrics.csv take a second or two; 40 steps took less)


@pytest.mark.slow
def test_a_sweep_searches_a_field_of_the_tasks_own_stops_bad_trials_early_and_restores_after_an_interruption(
    tmp_path,
):
    """--space over a field the default space does not hold (charlm's model.heads, each value a trial) beside --lr;
    ASHA stops bad trials early; each trial logs as an MLflow run; an interrupted sweep restores and finishes."""
    # A grid over both: a good learning rate's two trials first, then two that barely move (Tune's order), so ASHA
    # compares the bad ones with the good ones at each rung.
    sweep = [
        "examples/sweep.py",
        "examples/charlm.py",
        "--trials",
        "1",
        "--lr",
        "0.01",
        "1e-6",
        "--space",
        "model.heads=grid:1,2",
        "--width",
        "32",
        "--batch-size",
        "32",
        "--max-concurrent",
        "2",
        "--out-dir",
        str(tmp_path),
        "--name",
        "s",
        "--",
        *TRIAL,
    ]
    first = started(sweep)
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None:  # until a trial has validated once
        if any("val/" in p.read_text() for p in (tmp_path / "s").glob("trial_*/metrics.csv")):
            break
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGINT)  # Ctrl+C: Tune saves the sweep's state and stops
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 1 and "finish it with: " in out, out[-3000:]
    assert len(list((tmp_path / "s").glob("trial_*/test_metrics.json"))) < 4  # it was cut short

    result = run_script([*sweep[:1], "--restore", *sweep[1:]], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    from ray.tune import ExperimentAnalysis

    reports = ExperimentAnalysis(str(tmp_path / "s" / "ray" / "s")).trial_dataframes.values()
    assert len(reports) == 4
    assert any(df["step"].max() < STEPS for df in reports)  # stopped early by ASHA
    best = re.search(r"best trial: (\w+): val/bpc ([\d.]+) at step (\d+)", result.stdout)
    assert best and float(best[2]) == pytest.approx(min(df["val/bpc"].min() for df in reports), abs=1e-4)
    assert f"checkpoint: {tmp_path / 's' / best[1] / 'checkpoints'}" in result.stdout

    trials = {p.name for p in (tmp_path / "s").glob("trial_*") if (p / "metrics.csv").exists()}
    assert len(trials) == 4  # every trial has its run folder ...
    chosen = [json.loads((tmp_path / "s" / t / "config.json").read_text()) for t in trials]
    assert sorted((c["model"]["heads"], c["optim"]["lr"]) for c in chosen) == [
        (1, 1e-6),
        (1, 0.01),
        (2, 1e-6),
        (2, 0.01),
    ]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the local default: no server
    runs = mlflow.search_runs(experiment_names=["s"])
    assert set(runs["tags.mlflow.runName"]) == trials and len(runs) == 4  # ... and its MLflow run, resumed ones once
    shown = runs[["tags.mlflow.runName", "status", "metrics.val/bpc"]].to_string()
    assert runs["metrics.val/bpc"].notna().all(), shown + "\n" + result.stdout[-6000:]
    stopped = {trial for trial in trials if not (tmp_path / "s" / trial / "test_metrics.json").exists()}
    assert stopped and set(runs[runs.status == "KILLED"]["tags.mlflow.runName"]) == stopped  # closed when ASHA stopped
    for trial in trials - stopped:  # cut short by the interruption, restored: each went on to its full length
        assert sorted(train_losses(tmp_path / "s" / trial)) == list(range(5, STEPS + 1, 5)), trial  # logged every 5
    assert set(runs.status) == {"FINISHED", "KILLED"} and runs.end_time.notna().all()
    mlflow.set_tracking_uri(None)  # it sets MLFLOW_TRACKING_URI too: a later test's runs would go to this store
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_a_restored_sweeps_asha_judges_new_trials_against_the_trials_that_ended_before_it(tmp_path):
    """Tune does not save its scheduler: the sweep's ASHA hears again what each restored trial's run recorded, so a
    bad trial after a restore is stopped at its first rung, as it would have been without the interruption. Its
    rungs are counted in steps: a restored trial's validations, reported again, are not judged twice."""
    import importlib.util

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    spec = importlib.util.spec_from_file_location("sweep", ROOT / "examples" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    options = {"time_attr": "step", "grace_period": 10, "max_t": 201, "reduction_factor": 2}
    ended = [Trial("trial", stub=True) for _ in range(2)]
    for number, trial in enumerate(ended):  # good trials that ran to their end before the interruption
        (tmp_path / str(trial)).mkdir()
        rows = [f"{step},val/bpc,{2.0 + number + 1 / step}" for step in range(10, 201, 10)]
        (tmp_path / str(trial) / "metrics.csv").write_text("step,name,value\n" + "\n".join(["5,train/loss,3", *rows]))

    def after_restore(scheduler) -> list[str]:
        scheduler.set_search_properties("val/bpc", "min")
        for trial in ended:
            scheduler.on_trial_add(None, trial)
        bad = Trial("trial", stub=True)  # a trial that had not started: no run folder
        scheduler.on_trial_add(None, bad)
        return [scheduler.on_trial_result(None, bad, {"step": step, "val/bpc": 8.0}) for step in (10, 20)]

    assert after_restore(sweep.replaying_asha(tmp_path, "val/bpc", **options))[0] == TrialScheduler.STOP
    assert after_restore(ASHAScheduler(**options)) == [TrialScheduler.CONTINUE] * 2  # what Tune's own would do

    replaying = sweep.replaying_asha(tmp_path, "val/bpc", **options)
    replaying.set_search_properties("val/bpc", "min")
    replaying.on_trial_add(None, ended[1])  # the worse of the two, restored while still running ...
    replaying.on_trial_add(None, ended[0])
    again = [replaying.on_trial_result(None, ended[1], {"step": s, "val/bpc": 3.1}) for s in range(10, 201, 10)]
    assert again == [TrialScheduler.CONTINUE] * 20  # ... reports them again: its rungs were judged already
    linked = Trial("trial", stub=True)  # a run folder that is a link to a good trial's: not read
    (tmp_path / str(linked)).symlink_to(tmp_path / str(ended[0]))
    replaying.on_trial_add(None, linked)
    assert replaying.on_trial_result(None, linked, {"step": 10, "val/bpc": 8.0}) == TrialScheduler.STOP
    trials = ["examples/charlm.py", "--train.val-every", "10"]
    assert sweep.rungs_in_steps(parse_config([*trials, "--train.max-steps", "200"])) == (10, 201)  # past the last


def test_a_trial_reads_its_runs_validations_without_importing_torch(tmp_path):
    """A trial polls its run's metrics.csv from a Ray worker. Importing torch there took half a minute on a busy
    machine: the run had ended before its first validation was reported, and ASHA's stop came too late."""
    (tmp_path / "metrics.csv").write_text("step,name,value\n5,train/loss,3\n10,val/bpc,2.5\n")
    probe = (
        "import importlib.util, sys\n"
        "from pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('sweep', {str(ROOT / 'examples' / 'sweep.py')!r})\n"
        "sweep = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(sweep)\n"
        "print(sweep.validations(Path('metrics.csv'), 'val/bpc'), 'torch' in sys.modules)\n"
        "sweep.validations(Path('metrics.csv'), 'val/bpc')\n"
        "print(sys.path.count(str(sweep.ROOT)))\n"  # called every half second: the path does not grow
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.stdout.split("\n")[:2] == ["[(10, 2.5)] False", "1"], result.stdout + result.stderr[-3000:]


@pytest.mark.slow  # starts processes of its own
def test_a_mistake_in_the_trials_flags_is_one_line_before_anything_starts(tmp_path):
    sweep = ["examples/sweep.py", "examples/charlm.py", "--out-dir", str(tmp_path)]
    result = run_script([*sweep, "--", "--optim.lr", "-1"])
    expected = "error: optim.lr: expected a positive number at most 1e30, got -1.0"
    assert result.returncode == 2 and result.stderr.strip() == expected, result.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # no Ray, no trial, no run folder


@pytest.mark.slow  # starts processes of its own
def test_restoring_a_missing_or_damaged_sweep_is_one_line_before_ray_starts(tmp_path):
    sweep = ["examples/sweep.py", "examples/charlm.py", "--out-dir", str(tmp_path), "--name", "s", "--restore"]
    result = run_script(sweep)
    folder = tmp_path / "s" / "ray" / "s"
    expected = f"error: restore: no sweep in {folder} (no tuner.pkl); start it without --restore"
    assert result.returncode == 2 and result.stderr.strip() == expected, result.stderr[-2000:]
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"\x80\x05\x95 truncated")
    result = run_script(sweep)
    assert result.returncode == 2 and result.stderr.strip().startswith(
        f"error: restore: {folder / 'tuner.pkl'} is damaged ("
    ), result.stderr[-2000:]
    assert "\n" not in result.stderr.strip() and not (tmp_path / "s" / "ray" / "s" / "basic-variant-state").exists()


@pytest.mark.slow
def test_a_sweeps_trial_has_two_processes_and_a_field_the_task_does_not_have_is_one_line(tmp_path):
    """A trial with several devices: its run starts one process a device, as Fabric launches them (here 2 CPU
    processes; on GPUs, --gpus-per-trial 2 -- --fabric.devices 2), and logs as one MLflow run. A field the task does
    not have is one line before anything starts."""
    sweep = ["examples/sweep.py", "examples/charlm.py", "--trials", "1", "--lr", "0.01", "--width", "32"]
    sweep += ["--batch-size", "32", "--cpus-per-trial", "2", "--max-concurrent", "1"]
    sweep += ["--out-dir", str(tmp_path), "--name", "h"]
    trial = ["--model.depth", "1", "--data.context", "32", "--schedule.warmup-steps", "2", "--train.max-steps", "10"]
    trial += ["--train.val-every", "5", "--log.every", "5", "--fabric.accelerator", "cpu", "--fabric.devices", "2"]
    trial += ["--log.no-pictures"]
    result = run_script([*sweep, "--space", "model.heads=grid:2", "--", *trial], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    heads = [json.loads(p.read_text())["model"]["heads"] for p in (tmp_path / "h").glob("trial_*/config.json")]
    assert heads == [2] and "2 processes" in result.stdout
    assert all((folder / "test_metrics.json").exists() for folder in (tmp_path / "h").glob("trial_*"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["h"])
    said = [line for line in result.stdout.splitlines() if "mlflow" in line.lower() or "warning" in line.lower()]
    assert list(runs["tags.world_size"]) == ["2"], (runs.to_string(), said)
    assert list(runs.status) == ["FINISHED"], (runs.to_string(), said)
    assert sorted(runs.filter(like="metrics.val/bpc").columns) == ["metrics.val/bpc"]
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    bad = run_script([*sweep, "--name", "bad", "--space", "model.channels=8,16", "--", *trial])
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: space: 'model.channels=8,16': expected")
    assert not (tmp_path / "bad").exists()
