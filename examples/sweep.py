"""Search a task's config with Ray Tune. Each trial is an ordinary kibitz run: its own run folder and checkpoints, its
own MLflow run in the sweep's experiment, and the task's ranking validation metric reported at every validation, so
an ASHA scheduler stops bad trials early. Flags after `--` go to every trial.

    python examples/sweep.py --trials 8                               # the chess evaluator, on this machine
    python examples/sweep.py examples/charlm.py --trials 8 -- --train.max-steps 2000
    python examples/sweep.py --restore                                # finish an interrupted sweep
    ray start --head; ray start --address=HEAD:6379                   # a cluster (on the head, then each worker)
    RAY_ADDRESS=HEAD:6379 python examples/sweep.py --trials 64 --gpus-per-trial 1
    python examples/sweep.py --gpus-per-trial 2 -- --fabric.devices 2    # each trial on two GPUs

On a cluster every node needs this checkout at the same path, and the trials a shared --out-dir and a tracking
server (-- --log.mlflow-uri http://HOST:5000) to write to. The best trial's config and checkpoint come last."""

import dataclasses
import fcntl
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(ROOT))  # the trainer, after this file's folder

from config import OUT_DIR  # noqa: E402  (the trainer's, found through the line above)


@dataclass
class SweepArgs:
    task: tyro.conf.Positional[str] = "chess"
    """A built-in task or a task file."""
    trials: int = 8
    """Trials sampled from the space (with --lr values: trials for each of them)."""
    lr: tuple[float, ...] = ()
    """Learning rates to try, each one (a grid); unset: log-uniform in lr_range."""
    lr_range: tuple[float, float] = (1e-4, 3e-2)
    width: tuple[int, ...] = (128, 256, 512)
    """model.width, one of these a trial (none given: the task's own)."""
    batch_size: tuple[int, ...] = (256, 512, 1024)
    """data.batch_size, one of these a trial (none given: the task's own)."""
    max_concurrent: int = 2
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    """GPUs Ray gives each trial (its run uses them with -- --fabric.devices N)."""
    name: str = "sweep"
    """The sweep: Ray Tune's experiment folder, the MLflow experiment, the folder of the trials' runs."""
    out_dir: Path = OUT_DIR
    restore: bool = False
    """Finish the interrupted sweep of this name (trials cut short resume from their last checkpoint)."""
    space: tuple[str, ...] = ()
    """Any config field of the task and its values, beside or instead of the three above: FIELD=A,B,C (one of them
    a trial), FIELD=grid:A,B,C (each), FIELD=loguniform:LOW:HIGH or FIELD=uniform:LOW:HIGH; e.g. --space
    model.channels=8,16,32 optim.weight_decay=loguniform:1e-4:1e-1."""


def space(args: SweepArgs, cfg) -> dict:
    """What the trials vary: the fields of the task's config among these (a task may have no model.width)."""
    from ray import tune

    lr = tune.grid_search(list(args.lr)) if args.lr else tune.loguniform(*args.lr_range)
    wanted = {
        "optim.lr": lr,
        "model.width": args.width and tune.choice(args.width),
        "data.batch_size": args.batch_size and tune.choice(args.batch_size),
    }
    wanted = {key: domain for key, domain in wanted.items() if domain and has_field(cfg, key)}
    return {**wanted, **dict(domain_of(entry, cfg) for entry in args.space)}


def domain_of(entry: str, cfg) -> tuple:
    """`FIELD=SPEC` as (field, Tune's domain), each value of the field's own type; a field the task's config does not
    have, or a value it cannot take, is one line."""
    from ray import tune

    import config

    field, _, spec = entry.partition("=")
    hints = {name: hint for name, hint, _ in config.leaf_fields(cfg)}
    if field not in hints or not spec:
        known = ", ".join(sorted(hints))
        raise config.ConfigError(f"space: {entry!r}: expected FIELD=VALUES with a field of the task's config ({known})")
    kind, _, bounds = spec.partition(":")
    if kind in ("loguniform", "uniform") and len(limits := bounds.split(":")) == 2:
        low, high = (typed(field, hints[field], value) for value in limits)
        return field, (tune.loguniform if kind == "loguniform" else tune.uniform)(low, high)
    if kind == "grid":  # every value, each in trials of its own
        return field, tune.grid_search([typed(field, hints[field], value) for value in bounds.split(",")])
    return field, tune.choice([typed(field, hints[field], value) for value in spec.split(",")])


def typed(field: str, hint, text: str):
    """`text` as a value of the field's type (int, float, bool or str; an optional field's inner type)."""
    import typing

    import config

    kinds = [kind for kind in (typing.get_args(hint) or (hint,)) if kind in (int, float, bool, str)]
    for kind in kinds:
        try:
            return {"true": True, "false": False}[text.lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            continue
    raise config.ConfigError(f"space: {field}: expected values of its type ({hint}), got {text!r}")


def has_field(cfg, dotted: str) -> bool:
    section, _, name = dotted.partition(".")
    return dataclasses.is_dataclass(part := getattr(cfg, section, None)) and hasattr(part, name)


# The trial's run, under a small guard process that passes on one SIGTERM, however many it gets: from the trial when
# Tune stops it, and from the kernel when the trial's thread is gone (Ray ending the trial's actor: prctl
# PR_SET_PDEATHSIG, Linux). The run saves, closes its trackers and exits; a second signal would stop it at once.
GUARD = """
import ctypes, os, signal, subprocess, sys
libc = ctypes.CDLL(None)
hasattr(libc, "prctl") and libc.prctl(1, signal.SIGTERM)
run = subprocess.Popen([sys.executable, *sys.argv[1:]], start_new_session=True)
stopped = []
def stop(signum, frame):
    if not stopped:
        stopped.append(signum)
        os.killpg(run.pid, signal.SIGTERM)
signal.signal(signal.SIGTERM, stop)
sys.exit(run.wait())
"""


def trial(params: dict, task: str, flags: list[str], runs: str, where: str, metric: str, mode: str) -> None:
    """One trial: `python train.py` in a process of its own (Fabric starts one more a device), named after the trial
    so a restored sweep resumes it. Each validation's metric, read back from the run's metrics.csv, is reported to
    Tune; stopped by Tune, the run gets SIGTERM: it saves, closes its MLflow run as KILLED and exits."""
    import subprocess

    from ray import tune
    from ray.train._internal.session import get_session  # this trial's; Tune ends it when it stops the trial

    name = tune.get_context().get_trial_name()
    chosen = [item for key, value in params.items() for item in flag_of(key, value)]
    run = [*flags, *chosen, "--out-dir", runs, "--run-name", name, "--resume", "auto"]
    process = subprocess.Popen([sys.executable, "-c", GUARD, str(ROOT / "train.py"), task, *run], cwd=where)
    folder, sent, best = Path(runs) / name, 0, None
    try:
        while get_session() is not None:  # stopped by Tune (ASHA): later reports would be ignored, the run stops
            ended = process.poll() is not None
            found = validations(folder / "metrics.csv", metric)
            for step, value in found[sent:]:
                if best is None or (value < best[0] if mode == "min" else value > best[0]):
                    best = (value, step)
                checkpoint = folder / "checkpoints" / f"step-{best[1]:08d}.ckpt"  # the best so far: kept (keep-best)
                tune.report({metric: value, "step": step, "checkpoint": str(checkpoint)})
            sent = len(found)
            if ended:
                break
            time.sleep(0.5)
    finally:
        if process.poll() is None:  # stopped by Tune (report raised), or the sweep interrupted
            process.send_signal(signal.SIGTERM)
            process.wait()
    if process.returncode:
        raise RuntimeError(f"{name}: train.py exited with code {process.returncode} (its output is above)")


def flag_of(field: str, value) -> list[str]:
    """The command line's words for one chosen value: `--section.name VALUE`, or `--section.[no-]name` for a bool."""
    section, _, name = field.replace("_", "-").rpartition(".")
    if isinstance(value, bool):
        return [f"--{section}.{name}" if value else f"--{section}.no-{name}"]
    return [f"--{section}.{name}", str(value)]


def validations(metrics_csv: Path, metric: str) -> list[tuple[int, float]]:
    """The run's (step, value) of `metric`. A trial calls it every half second from a Ray worker, where this file's
    own line that puts the trainer on the path has not run: it is put there once, not at every call."""
    if sys.path[1:2] != [str(ROOT)]:
        sys.path.insert(1, str(ROOT))
    from kibitz.tracking.sinks import metric_rows

    return [(int(step), float(value)) for step, name, value in metric_rows(metrics_csv) if name == metric]


def rungs_in_steps(cfg) -> tuple[int, int]:
    """ASHA's first rung and its max_t, in the run's steps (the `step` of each report). Rungs counted in steps stay
    where they are when a restored trial reports its validations again, as it does. The rungs are the trial's own:
    the first validation, then twice as many steps each time (ASHA's default, 100 reports, stopped a longer trial
    that was never beaten). max_t lies past the last step, because a trial that reaches max_t is stopped by Tune at
    that report, which would cut short its test and its MLflow run's close."""
    t = cfg.train
    last = t.max_steps if t.max_steps is not None else 10**9  # bounded by time or epochs: the trial's own limit
    return t.val_every or 1, last + 1


def replaying_asha(runs: Path, metric: str, **options):
    """ASHA that, when Tune adds a restored trial, first hears the validations that trial's run has recorded. Tune
    does not save its scheduler's state, so after a restore ASHA would know nothing of the trials that ended before
    the interruption, and judge the trials still to run only against each other."""
    from ray.tune.schedulers import ASHAScheduler

    class ReplayingASHA(ASHAScheduler):
        def on_trial_add(self, tune_controller, trial):
            super().on_trial_add(tune_controller, trial)
            name = str(trial)
            plain = Path(name).name == name and name not in (".", "..")  # a name from Tune's state file
            if not plain or (runs / name).is_symlink():  # links are never followed
                return
            for step, value in validations(runs / name / "metrics.csv", metric):  # none for a new trial
                self.on_trial_result(tune_controller, trial, {"step": step, metric: value})

    return ReplayingASHA(**options)


def wait_for_trial_runs(runs: Path, patience: float = 120) -> None:
    """A trial that Tune stopped may still be closing its run (its checkpoint, its MLflow run) when Tune is done: the
    sweep ends once every trial's run has released its folder (a run holds its .lock for as long as it runs)."""
    deadline = time.monotonic() + patience
    for lock in sorted(runs.glob("trial_*/.lock")):
        try:
            held = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone, or a link: nothing of ours to wait for
            continue
        try:
            while time.monotonic() < deadline:
                try:
                    fcntl.lockf(held, fcntl.LOCK_SH | fcntl.LOCK_NB)  # free: the run has ended
                    break
                except OSError:
                    time.sleep(0.2)
        finally:
            os.close(held)


def restorable(folder: Path) -> None:
    """A sweep to restore: Tune's state file there, whole (its pickle's opcodes read, none run), or one line."""
    import pickletools

    from config import ConfigError

    state = folder / "tuner.pkl"
    if not state.is_file():
        raise ConfigError(f"restore: no sweep in {folder} (no {state.name}); start it without --restore")
    try:
        for _ in pickletools.genops(state.read_bytes()):
            pass
    except Exception as exc:
        raise ConfigError(f"restore: {state} is damaged ({type(exc).__name__}: {exc}); start the sweep again") from None


def main(args: SweepArgs, flags: list[str]) -> None:
    if args.restore:  # before Ray and MLflow are imported: seconds
        restorable(args.out_dir / args.name / "ray" / args.name)
    import mlflow
    import ray
    from ray import tune

    import config
    from kibitz import cli
    from kibitz.tracking import loggers, mlflow_sink

    task, _, cfg, _ = cli.parse([args.task, *flags])
    cfg = config.for_task(cfg, task)
    config.check(cfg, task)  # the flags every trial gets: a mistake is one line now, not one per trial
    metric, mode = config.ranking_metric(cfg, task)
    searched = space(args, cfg)  # a field the task does not have: one line, before Ray starts
    uri = loggers.mlflow_uri(cfg, args.out_dir)  # the trials get it as a flag: one store for the sweep
    runs = (args.out_dir / args.name).resolve()
    flags = [
        *flags,
        "--log.logger",
        "csv",
        "mlflow",
        "--log.mlflow-uri",
        uri,
        "--log.project",
        args.name,
        "--log.no-progress-bar",
    ]
    for name, value in mlflow_sink.MLFLOW_PATIENCE.items():  # a server that is down: seconds, not minutes of retries
        os.environ.setdefault(name, value)
    try:  # the experiment made now: two trials would race to make it
        mlflow_sink.experiment_of(mlflow.MlflowClient(uri), args.name, uri)
    except Exception as exc:
        sys.exit(f"error: MLflow at {uri}: cannot use it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    ray.init(include_dashboard=False, **({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": os.cpu_count()}))
    trainable = tune.with_resources(
        tune.with_parameters(
            trial, task=args.task, flags=flags, runs=str(runs), where=os.getcwd(), metric=metric, mode=mode
        ),
        {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
    )
    folder = str(runs / "ray")
    if args.restore:
        tuner = tune.Tuner.restore(folder + "/" + args.name, trainable, resume_unfinished=True, restart_errored=True)
    else:
        first, last = rungs_in_steps(cfg)
        tuner = tune.Tuner(
            trainable,
            param_space=searched,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=args.trials,
                max_concurrent_trials=args.max_concurrent,
                scheduler=replaying_asha(
                    runs, metric, time_attr="step", grace_period=first, max_t=last, reduction_factor=2
                ),
            ),
            run_config=tune.RunConfig(name=args.name, storage_path=folder, verbose=1),
        )
    interrupted = []  # Ctrl+C: noted here, then passed to Tune as the SIGUSR1 it stops on, saving the sweep's state
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(os.kill(os.getpid(), signal.SIGUSR1)))
    grid = tuner.fit()
    if interrupted or grid.num_errors:
        again = shlex.join(["python", *sys.argv[:1], "--restore", *(a for a in sys.argv[1:] if a != "--restore")])
        why = "was interrupted" if interrupted else f"had {grid.num_errors} failed trials (their errors are above)"
        sys.exit(f"the sweep {why}; its state is in {folder}; finish it with: {again}")
    wait_for_trial_runs(runs)
    client = mlflow.MlflowClient(uri)
    for id_file in runs.glob("trial_*/mlflow_id.txt"):  # a stopped trial whose process Ray ended before it closed
        if client.get_run(run_id := id_file.read_text().strip()).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    best = grid.get_best_result(metric, mode, scope="all")  # the trial of the best validation
    reports = best.metrics_dataframe
    top = reports.loc[reports[metric].idxmin() if mode == "min" else reports[metric].idxmax()]
    print(
        f"best trial: {Path(best.metrics['checkpoint']).parent.parent.name}: {metric} {top[metric]:.4f} "
        f"at step {top['step']}"
    )
    print(f"  config: {' '.join(f'--{k} {v}'.replace('_', '-') for k, v in best.config.items())}")
    print(f"  checkpoint: {best.metrics['checkpoint']}")


if __name__ == "__main__":
    import config
    from kibitz import tools

    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    try:
        main(tyro.cli(SweepArgs, args=argv[:cut]), argv[cut + 1 :])
    except config.ConfigError as exc:  # a bad task or flag for the trials: one line, before anything starts
        sys.exit(tools.exit_code(exc))
