"""MLflow as a tracker, against a real `mlflow server` (SQLite store, local artifact root) on 127.0.0.1: what a run
logs reads back through `mlflow.search_runs` and `MlflowClient` as the run folder has it; a run killed with kill -9
and resumed continues its MLflow run with every step once; a server that stops mid-run costs one warning."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import LONG, STEPS, child_env, free_port, run_train, start, tiny_args, train_losses, wait_for_steps

mlflow = pytest.importorskip("mlflow")  # the .[mlflow] extra (the test extra installs it)


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--default-artifact-root",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "server.log", "w"),
        start_new_session=True,
        env=child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # no job workers: tracking only, a faster start
    )
    uri, deadline = f"http://127.0.0.1:{port}", time.time() + 90
    while time.time() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return process, uri
        except OSError:
            time.sleep(0.2)
    stop_server(process)
    raise AssertionError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)  # the server and its workers
    process.wait()


@pytest.fixture(autouse=True)
def tracking_uri_restored():
    """mlflow.set_tracking_uri (reading runs back, as a user would) also sets MLFLOW_TRACKING_URI in os.environ: a
    later test's run in this process, or a process it starts, would log to this test's server."""
    yield
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    process, uri = start_server(folder)
    yield process, uri
    if process.poll() is None:
        stop_server(process)


def flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def csv_history(run_dir: Path) -> dict[str, dict[int, float]]:
    from kibitz.tracking import sinks

    history: dict[str, dict[int, float]] = {}
    for step, name, value in sinks.metric_rows(run_dir / "metrics.csv"):
        history.setdefault(name, {})[int(step)] = float(value)
    return history


def the_run(uri: str, experiment: str, run_dir: Path):
    """The one MLflow run of a run folder, found by searching, as a user would."""
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.mlflow.runName = '{run_dir.name}'")
    assert len(runs) == 1, runs
    run_id = runs.run_id[0]
    assert (run_dir / "mlflow_id.txt").read_text() == run_id
    return runs.iloc[0], mlflow.MlflowClient(uri).get_run(run_id)


def assert_run_is_the_folder(uri: str, experiment: str, run_dir: Path, task: str, pictures: list[str]) -> None:
    mlflow.set_tracking_uri(uri)
    row, run = the_run(uri, experiment, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    code = saved.pop("code")
    assert run.data.params == flat(saved)  # the whole config, as the compare view and the filters see it
    assert row["params.optim.lr"] == str(saved["optim"]["lr"])
    client = mlflow.MlflowClient(uri)
    for name, steps in csv_history(run_dir).items():  # every metric at every step it was logged, once
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == sorted(steps), name
        assert all(m.value == pytest.approx(steps[m.step], rel=1e-6, nan_ok=True) for m in history), name
    tested = json.loads((run_dir / "test_metrics.json").read_text())
    assert tested and all(run.data.metrics[k] == pytest.approx(v) for k, v in tested.items())
    tags = run.data.tags
    assert tags["task"] == task and tags["world_size"] == "1" and tags["device"] == "cpu"
    assert tags["mlflow.source.git.commit"] == (code["commit"] or "unknown")
    assert tags["git.dirty"] == str(code["dirty"]).lower() and tags["kibitz.version"] == version("kibitz")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "test_metrics.json", "curves.png", *pictures} <= artifacts, artifacts
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_runs_read_back_a_killed_run_resumes_into_its_mlflow_run_and_a_server_that_stops_costs_one_warning(
    server, prepared, tmp_path, capsys
):
    """One server for all of it: starting one costs seconds."""
    from tiny_task import TASK

    import train

    process, uri = server
    to_server = ["--log.logger", "csv", "mlflow", "--log.mlflow-uri", uri, "--log.project", "kibitz-test"]
    run_train(tiny_args(prepared, tmp_path, "--run-name", "chess", "--log.pictures", *to_server))
    assert_run_is_the_folder(uri, "kibitz-test", tmp_path / "chess", "chess", ["test_predictions.png"])

    charlm = [
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
        "--train.max-steps",
        "20",
        "--train.val-every",
        "10",
        "--log.every",
        "5",
        "--log.no-progress-bar",
    ]
    lm = ["--out-dir", str(tmp_path), "--run-name", "lm", "--log.checkpoint-artifacts"]  # checkpoints when asked
    assert train.main(["examples/charlm.py", *charlm, *lm, *to_server]) == 0
    assert_run_is_the_folder(uri, "kibitz-test", tmp_path / "lm", "charlm", ["checkpoints"])
    client, (_, chess_run) = mlflow.MlflowClient(uri), the_run(uri, "kibitz-test", tmp_path / "chess")
    assert "checkpoints" not in {a.path for a in client.list_artifacts(chess_run.info.run_id)}  # only when asked
    _, lm_run = the_run(uri, "kibitz-test", tmp_path / "lm")
    saved = {a.path for a in client.list_artifacts(lm_run.info.run_id, "checkpoints")}
    assert {f"checkpoints/{p.name}" for p in (tmp_path / "lm" / "checkpoints").glob("step-*.ckpt")} <= saved

    def mistake(run) -> None:
        raise ValueError("a bug in a hook")

    failing = dataclasses.replace(TASK, hooks=lambda cfg, datasets: {"on_validation_end": [mistake]})
    assert train.main(["--out-dir", str(tmp_path), "--run-name", "failed", *to_server], task=failing) == 2
    _, run = the_run(uri, "kibitz-test", tmp_path / "failed")
    assert run.info.status == "FAILED" and run.info.end_time  # closed, not left RUNNING

    killed_and_resumed(uri, prepared, tmp_path)  # kill -9, then --resume auto: the same MLflow run, every step once
    capsys.readouterr()

    def stop_the_server(run) -> None:  # mid-run, between two logs, once the sink's thread has sent a metric
        if run.step == 10:
            sent_a_metric(uri, tmp_path / "stopped")
            stop_server(process)

    task = dataclasses.replace(TASK, hooks=lambda cfg, datasets: {"on_log": [stop_the_server]})
    tiny = ["--out-dir", str(tmp_path), "--run-name", "stopped", "--train.max-steps", "40", "--log.every", "1"]
    assert train.main([*tiny, *to_server], task=task) == 0
    out = capsys.readouterr()
    warnings = [line for line in (out.out + out.err).splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "MLflow tracker failed" in warnings[0], warnings
    assert sorted(train_losses(tmp_path / "stopped")) == list(range(1, 41))  # metrics.csv has every step
    assert (tmp_path / "stopped" / "test_metrics.json").exists()


def sent_a_metric(uri: str, run_dir, patience: float = 120) -> None:
    """Waits until the MLflow run of `run_dir` holds a metric: its sink's thread has set the run up (a server that
    stops before that is the "could not start" warning, tested elsewhere)."""
    client, deadline = mlflow.MlflowClient(uri), time.monotonic() + patience
    while time.monotonic() < deadline:
        id_file = run_dir / "mlflow_id.txt"
        if id_file.exists() and client.get_run(id_file.read_text().strip()).data.metrics:
            return
        time.sleep(0.2)
    raise AssertionError(f"no metric reached MLflow from {run_dir} in {patience} s")


def killed_and_resumed(uri: str, prepared, tmp_path) -> None:
    to_server = ["--log.logger", "csv", "mlflow", "--log.mlflow-uri", uri, "--log.project", "kibitz-test"]
    process = start(prepared, tmp_path, "killed", *to_server)
    wait_for_steps(tmp_path / "killed", 30, process)
    deadline = time.monotonic() + 120  # MLflow's set-up runs beside the training, in its sink's thread
    while not (tmp_path / "killed" / "mlflow_id.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run_id = (tmp_path / "killed" / "mlflow_id.txt").read_text()
    run_train(tiny_args(prepared, tmp_path, *LONG, *to_server, "--run-name", "killed", "--resume", "auto"))
    _, run = the_run(uri, "kibitz-test", tmp_path / "killed")
    assert run.info.run_id == run_id
    losses = mlflow.MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))  # every step, none twice
    expected = train_losses(tmp_path / "killed")
    assert all(m.value == pytest.approx(expected[m.step], rel=1e-6) for m in losses)
    assert run.info.status == "FINISHED"


def test_a_server_that_cannot_be_reached_at_the_start_costs_one_warning(tmp_path, capsys):
    from tiny_task import TASK

    import train

    port = free_port()  # a port that nothing listens on
    args = ["--out-dir", str(tmp_path), "--run-name", "unreached", "--log.logger", "mlflow"]
    assert train.main([*args, "--log.mlflow-uri", f"http://127.0.0.1:{port}"], task=TASK) == 0
    out = capsys.readouterr()
    warnings = [line for line in (out.out + out.err).splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "mlflow logger could not start" in warnings[0], warnings
    assert (tmp_path / "unreached" / "test_metrics.json").exists() and train_losses(tmp_path / "unreached")
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # kibitz's shorter retries were for its run only
