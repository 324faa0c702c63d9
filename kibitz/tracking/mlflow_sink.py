"""The MLflow sink (loggers.py fans out to it beside metrics.csv): one MLflow run per kibitz run, on rank 0, so runs
can be compared, searched and filtered by parameter in MLflow's UI or as a DataFrame (`mlflow.search_runs`)."""

import os
import queue
import re
import threading
import time
from pathlib import Path

from kibitz.storage import write_atomic
from kibitz.tracking.sinks import csv_rows, flat_hparams


def experiment_of(client, name: str, uri: str) -> str:
    """The id of experiment `name`, made if new. A local SQLite store keeps its artifacts beside its database (MLflow's
    own default would be ./mlruns, wherever the run started)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    local = uri.startswith("sqlite:///") and (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=local or None)


MLFLOW_PATIENCE = {  # a tracking server that is down costs seconds, not MLflow's minutes of retries; the user's own win
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class MlflowLog:
    """An MLflow run: the flattened config as params, every metric at its step, tags that say what ran (task, git
    commit, version, world size, device), and at the end the run folder's config.json, test_metrics.json and
    pictures as artifacts. MLflow's import, the run's set-up and every call happen in a thread of their own, so
    neither a slow import nor a server's round trip holds up a step; the first that fails warns once and the rest
    are dropped (metrics.csv has every metric). The run id is
    kept in the run folder: a resumed run continues the same MLflow run, logging no step it already holds
    (MLflow would keep both), after replaying from metrics.csv the steps a killed process had not sent."""

    def __init__(self, run_dir: Path, uri: str, experiment: str, config: dict, tags: dict, resume_step=None):
        self.set_env = [name for name in MLFLOW_PATIENCE if name not in os.environ]
        os.environ.update({name: MLFLOW_PATIENCE[name] for name in self.set_env})
        self.run_dir, self.failed, self.recorded, self.last_step = run_dir, False, {}, 0
        self.ready, self.jobs = threading.Event(), queue.Queue()
        # MLflow's import and its store's set-up take seconds: they happen in the sending thread, off the training's
        # path; what is logged meanwhile waits in the queue.
        start = (uri, experiment, config, tags, resume_step)
        self.thread = threading.Thread(target=self._send, args=start, name="mlflow", daemon=True)
        self.thread.start()

    def _start(self, uri: str, experiment: str, config: dict, tags: dict, resume_step) -> None:
        import mlflow  # slow to import: only when used, in this sink's thread

        self.mlflow, run_dir = mlflow, self.run_dir
        self.client = mlflow.MlflowClient(uri)
        experiment_id = experiment_of(self.client, experiment, uri)
        id_file = run_dir / "mlflow_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        run = self._existing(run_id) if re.fullmatch(r"[0-9a-f]{32}", run_id) else None
        if run is None:
            run = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run.info.run_id
        write_atomic(id_file, self.run_id)
        self.recorded = self._recorded_steps() if resume_step is not None else {}  # {metric: its last step held}
        self.last_step = max(self.recorded.values(), default=0)
        self._log_params(flat_hparams(config), run.data.params)
        if resume_step is not None:
            for step, metrics in csv_rows(run_dir / "metrics.csv", 0, resume_step):
                self._log_metrics(metrics, step)

    def _existing(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except self.mlflow.exceptions.MlflowException:  # not in this tracking store: a new run
            return None

    def _recorded_steps(self) -> dict[str, int]:
        """Each metric's last step in the run, as the earlier processes left it."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in keys}

    def _log_params(self, params: dict, logged: dict) -> None:
        """Params are write-once in MLflow: a resumed run adds the new ones, and says which it could not change."""
        params = {key: str(value)[:6000] for key, value in params.items()}
        changed = sorted(k for k in params.keys() & logged.keys() if params[k] != logged[k])
        if changed:
            print(f"mlflow: run {self.run_id} keeps its first values of {', '.join(changed)}", flush=True)
        new = [self.mlflow.entities.Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def _call(self, function, *args) -> None:
        self.jobs.put((function, args))

    def _send(self, *start) -> None:
        try:
            self._start(*start)
        except Exception as exc:  # a tracker that cannot start must not cost the run
            self.failed = True
            reason = (str(exc).splitlines() or [""])[0][:200]
            print(
                f"warning: the mlflow logger could not start ({type(exc).__name__}: {reason}); training continues "
                f"without it ({self.run_dir / 'metrics.csv'} has every metric)",
                flush=True,
            )
        finally:
            self.ready.set()
        while (job := self.jobs.get()) is not None:
            if not self.failed:
                try:
                    job[0](*job[1])
                except Exception as exc:
                    self.failed = True
                    reason = (str(exc).splitlines() or [""])[0][:200]
                    print(
                        f"warning: the MLflow tracker failed ({type(exc).__name__}: {reason}); it is switched off, "
                        f"training continues; {self.run_dir / 'metrics.csv'} has every metric",
                        flush=True,
                    )

    def log(self, metrics: dict, step: int | None) -> None:
        self._call(self._log_metrics, dict(metrics), step)

    def _log_metrics(self, metrics: dict, step: int | None) -> None:
        """Each metric at its step (None: the last one logged), but for the steps of it that the run already holds."""
        step = self.last_step if step is None else step
        now, Metric = int(time.time() * 1000), self.mlflow.entities.Metric
        named = ((re.sub(r"[^\w./\- ]", "_", key), float(value)) for key, value in metrics.items())
        rows = [Metric(key, value, now, step) for key, value in named if step > self.recorded.get(key, -1)]
        for i in range(0, len(rows), 1000):  # MLflow takes at most 1000 metrics a call
            self.client.log_batch(self.run_id, rows[i : i + 1000])
        self.last_step = max(self.last_step, step)

    def log_histograms(self, histograms: dict, step: int) -> None:
        pass  # MLflow has no histograms: wandb or TensorBoard beside it show them

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self._call(self._log_table, name, {"columns": columns, "data": rows}, step)

    def _log_table(self, name: str, table: dict, step: int) -> None:
        if step > max(self.recorded.values(), default=-1):
            self.client.log_dict(self.run_id, table, f"tables/{name.replace('/', '-')}-{step:08d}.json")

    def log_image(self, name: str, path: Path, step: int) -> None:
        pass  # every picture in the run folder goes up at the end, as drawn last

    def log_checkpoint(self, path: Path, name: str, aliases: list[str], dropped: list[str]) -> None:
        """At once, not from the thread: keep-k may delete the file before its turn came."""
        self.ready.wait()
        if self.failed:
            return
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), f"checkpoints/{name}")
        else:
            self.client.log_artifact(self.run_id, str(path), f"checkpoints/{name}")

    def summary(self, metrics: dict) -> None:
        self.log(metrics, None)

    def finish(self, status: str = "FINISHED") -> None:
        for path in sorted([*self.run_dir.glob("*.json"), *self.run_dir.glob("*.png")]):
            self._call(lambda path: self.client.log_artifact(self.run_id, path), str(path))
        self._call(lambda: self.client.set_terminated(self.run_id, status))
        self.jobs.put(None)
        self.thread.join()
        self._restore_env()

    def _restore_env(self) -> None:
        for name in self.set_env:
            os.environ.pop(name, None)
