"""kibitz: train a network with an explicit Lightning Fabric loop.

    python train.py                       # the chess evaluator on the bundled sample
    python train.py dvae                  # the discrete VAE of boards on the same sample
    python train.py --help                # the tasks and tools; `python train.py chess --help`: every option
    python train.py chess --fabric.devices 2 --train.max-steps 5000
    python train.py chess --config runs/chess-.../config.json --optim.lr 3e-4
    python train.py chess --resume auto   # continue the newest run from its last checkpoint
    python train.py evaluate --ckpt runs/.../checkpoints/last.ckpt   # also: lr-find, export-config/-checkpoint
    python examples/charlm.py             # a task in a file of its own, through the same loop

Read top to bottom: `setup` builds everything a run shares (the Run), `fit` is the loop, `train` is
setup, fit, then a test of the best checkpoint. The task (config.Task) supplies the model, data, step
and evaluation; hooks (callbacks.py) only observe, and may ask the loop to stop.

The same script runs under `fabric run`, torchrun and SLURM: configs default to "auto" so the
launcher's settings apply.
"""

import contextlib
import dataclasses
import datetime
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASK_MODULES = {"model", "losses", "tasks", "figures", "predict"}  # the built-in tasks': a task's own may shadow them


def shadowing(folder: Path) -> str | None:
    """A task folder's module named like one of the trainer's (config.py, data.py): the task's folder comes first
    on the import path, so one would be imported in the other's place. The message, or None."""
    folder = folder.resolve()
    for theirs in sorted(folder.glob("*.py")) if folder != HERE else []:
        if (HERE / theirs.name).is_file() and theirs.stem not in TASK_MODULES:
            return (
                f"error: task: {theirs} has the name of the trainer's {HERE / theirs.name}: one would be imported in "
                f"the other's place; rename yours (say my_{theirs.name})"
            )
    return None


# Checked before the trainer's own imports, which a task folder's config.py would otherwise replace.
if __name__ != "__main__" and sys.path and (clash := shadowing(Path(sys.path[0] or "."))):
    sys.stderr.write(clash + "\n")
    sys.exit(2)

import torch
from lightning_fabric import Fabric

import callbacks
import checkpoints
import cli
import config
import configfile
import contract
import data
import distributed
import evaluation
import nonfinite
import storage
import tools
from config import ConfigError, RunConfig, Task
from schedules import learning_rate


@dataclass
class Run:
    """Everything the loop and the hooks share. The counters are what a checkpoint restores; the loop
    alone writes them (hooks may set should_stop)."""

    fabric: Fabric
    cfg: RunConfig
    task: Task
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    run_dir: Path
    train_loader: object
    eval_loaders: dict
    datasets: dict
    total_steps: int
    steps_per_epoch: int
    lr_at: object  # step -> learning rate
    clip: object  # this step's per-layer gradient norms -> None (clips the gradients in place)
    skip_sync: bool  # with accumulation, all-reduce gradients on the last micro-batch only
    params: list  # the trained parameters in the optimizer's order, and their names
    param_names: list
    sharded: bool  # FSDP2 DTensors: per-rank statistics are combined at log time
    monitor: tuple[str, str]  # the metric that ranks checkpoints, and min or max
    resume_command: str
    loggers: object = None
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps taken in the current epoch (the position inside it)
    lr: float = 0.0
    best: list = field(default_factory=list)  # [(score, checkpoint file name)], best first
    early_stop_best: float | None = None
    bad_validations: int = 0
    should_stop: bool = False  # the one value a hook may set
    loss_sum: torch.Tensor | None = None  # task.train_fields (loss first) summed on the device since the last log
    loss_before: torch.Tensor | None = None  # under on-nonfinite skip: loss_sum before this step
    steps_since_log: int = 0
    data_wait_s: float = 0.0  # host time spent waiting for batches since the last log
    grad_norms: torch.Tensor | None = None  # this step's per-parameter gradient norms (optimizer order)
    norm_rows: torch.Tensor | None = None  # every step's norms since the last log, read there for non-finite ones
    rows_used: int = 0
    stop_signal: int = 0  # SIGINT / SIGTERM / SIGUSR1 received: save and stop at the next log interval
    folder_lock: object = None  # held by rank 0 for the whole run: one writer per run folder
    train_fields: tuple = ("loss",)  # the names of what train_step logs (the loss first), fixed at its first call
    log_row: dict = field(default_factory=dict)
    val_metrics: dict = field(default_factory=dict)

    def progress(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best": self.best,
            "early_stop_best": self.early_stop_best,
            "bad_validations": self.bad_validations,
            "loss_sum": self.loss_sum.clone(),
            "steps_since_log": self.steps_since_log,
        }


def make_optimizer(model: torch.nn.Module, cfg: config.OptimConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (biases and norms are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def setup(cfg: RunConfig, task: Task, resume_command: str, fresh_name: str | None = None) -> Run:
    """Processes, data, model and optimizer (in Fabric's order), the run folder, a resumed state."""
    fabric = distributed.make_fabric(cfg.fabric, task.blocks, cfg.checkpoint.sharded)
    storage.write_directly(fabric)
    if os.environ.get("LT_CLI_USED") != "1":  # under `fabric run` the processes already exist
        fabric.launch()
    if fabric.device.type == "cuda":
        torch.set_float32_matmul_precision(cfg.fabric.matmul_precision)
    world = fabric.world_size
    micro_batch, remainder = divmod(cfg.data.batch_size, cfg.train.accumulate * world)
    if remainder or micro_batch == 0:
        raise ConfigError(
            f"data.batch_size: expected a multiple of train.accumulate x devices "
            f"({cfg.train.accumulate} x {world}), got {cfg.data.batch_size}"
        )

    # Data: built once if missing (rank 0 of each node first), then read by every rank.
    if task.prepare_data:
        with fabric.rank_zero_first(local=True):
            task.prepare_data(cfg)
    datasets = contract.call(task, "datasets", cfg)
    contract.check_datasets(task, datasets, cfg.data.on_device)
    on_device = fabric.device if cfg.data.on_device else None
    pin = fabric.device.type == "cuda"  # per-example batches, copied to the GPU without blocking
    train_loader = data.make_loader(
        datasets["train"],
        micro_batch,
        True,
        cfg.train.seed,
        fabric.global_rank,
        world,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        device=on_device,
        collate=task.collate,
        pin_memory=pin,
    )
    eval_loaders = {
        split: data.make_loader(
            datasets[split],
            cfg.data.eval_batch_size,
            False,
            0,
            fabric.global_rank,
            world,
            drop_last=False,
            device=on_device,
            max_batches=cfg.train.val_batches if split == "val" else None,
            collate=task.collate,
            pin_memory=pin,
        )
        for split in ("val", "test")
    }
    for split in ("val", "test") if cfg.train.val_every is not None else ("test",):
        if data.is_stream(datasets[split]):  # a stream's length is unknown until it is read
            continue
        if len(datasets[split]) == 0:  # its metrics would read 0.0 and pick the best checkpoint on nothing
            hint = "; --train.val-every None trains without validation" if split == "val" else ""
            raise ConfigError(f"data: the {split} split holds no examples (nothing to evaluate on{hint})")
    if data.is_stream(datasets["train"]) and cfg.train.max_epochs is not None:
        raise ConfigError("train.max_epochs: a stream has no epochs; bound the run with train.max_steps or max_time")
    steps_per_epoch = len(train_loader.sampler) // cfg.train.accumulate
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} exceeds the {len(datasets['train'])} training examples"
        )
    if not cfg.data.on_device:  # Fabric moves each evaluation batch to the device
        # The training batches are moved by the loop itself (Fabric's loader wrapper costs about 35 us a
        # step in Python, which shows on small models); evaluation is not on the hot path.
        eval_loaders = {k: data.evaluated_on(fabric, v) for k, v in eval_loaders.items()}

    # Model, then compile, then Fabric's wrappers, then the optimizer over the wrapped parameters. Seeded here, after
    # the data: whatever preparing or loading it drew (a task's random split, say), whether or not this process
    # prepared it, the weights and every later draw are the same on every rank and in every run with this seed.
    fabric.seed_everything(cfg.train.seed)
    model = contract.call(task, "build_model", cfg)
    contract.check_model(task, model)
    if cfg.train.compile:
        model = torch.compile(model)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(make_optimizer(model, cfg.optim, fused=fabric.device.type == "cuda"))
    if fabric.global_rank:  # the weights are drawn: from here each rank draws its own numbers (masks, noise);
        fabric.seed_everything(cfg.train.seed + fabric.global_rank, verbose=False)  # rank 0 keeps one process's
    name_of = {id(p): n for n, p in getattr(model, "_original_module", model).named_parameters()}
    named = [
        (name_of[id(p)], p)
        for group in optimizer.param_groups
        for p in group["params"]
        if p.requires_grad and id(p) in name_of
    ]

    limits = [cfg.train.max_steps or math.inf, (cfg.train.max_epochs or math.inf) * steps_per_epoch]
    total_steps = int(min(limits)) if min(limits) < math.inf else sys.maxsize  # max_time alone: no step limit
    s = cfg.schedule
    if total_steps == sys.maxsize and s.kind == "cosine" and s.total_steps is None:
        raise ConfigError(
            "schedule.total_steps: expected a step count for the cosine decay when only train.max_time limits the run"
        )
    if fresh_name is None:
        run_dir, resume_from = checkpoints.choose_run_dir(fabric, cfg)
    else:  # a new folder, made by rank 0 (the ranks' clocks may disagree on a name with the time in it)
        made = str(checkpoints.new_run_dir(cfg.out_dir, fresh_name)) if fabric.is_global_zero else None
        run_dir, resume_from = Path(fabric.broadcast(made, 0)), None
    folder_lock, error = None, None
    if fabric.is_global_zero:
        try:
            folder_lock = storage.lock_folder(run_dir)
        except (storage.FolderBusy, OSError) as exc:
            error = f"error: run_name: {exc}; choose another --run-name"
    distributed.stop_together(fabric, error)
    skip_sync = cfg.train.skip_grad_sync  # unset: on, except where skipping keeps whole gradients (FSDP)
    try:  # a failure from here on releases the run folder at once (a notebook may start another run)
        run = Run(
            fabric,
            cfg,
            task,
            model,
            optimizer,
            run_dir,
            train_loader,
            eval_loaders,
            datasets,
            total_steps,
            steps_per_epoch,
            skip_sync=not checkpoints.is_sharding(fabric) if skip_sync is None else skip_sync,
            lr_at=lr_schedule(cfg, total_steps),
            clip=distributed.gradient_clipper(fabric, model, optimizer, cfg.train.clip),
            params=[p for _, p in named],
            param_names=[n for n, _ in named],
            sharded=any(hasattr(p, "to_local") for _, p in named),
            monitor=config.monitored(cfg, task),
            resume_command=resume_command,
            loss_sum=torch.zeros(len(task.train_fields), device=fabric.device),
            loss_before=torch.zeros(len(task.train_fields), device=fabric.device),
            norm_rows=torch.empty(cfg.log.every, len(named), device=fabric.device),
            folder_lock=folder_lock,
        )
        resumed = cfg.resume is not None and checkpoints.restore(run, resume_from)
        if resumed:
            run.loss_before = run.loss_sum.clone()
        elif cfg.init_from:  # fine-tuning: the weights only, a fresh optimizer and counters (and with --resume auto,
            checkpoints.init_weights(run, cfg.init_from)  # the first start; the later ones resume)
        stop_on_signals(run)
        error = None
        if fabric.is_global_zero:
            try:
                (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
                for leftover in (run_dir / "checkpoints").glob("*.tmp"):  # of a save that was killed
                    storage.remove(leftover)
                configfile.save_json(dataclasses.replace(cfg, resume=None), run_dir / "config.json")
            except OSError as exc:
                error = f"error: cannot write the run folder {run_dir} ({exc})"
        distributed.stop_together(fabric, error)
        if fabric.is_global_zero:
            run.loggers = open_loggers(cfg, task, run_dir, run.step if cfg.resume else None)
            print(
                f"run folder: {run_dir}  ({world} process{'es' if world > 1 else ''}, {fabric.device}, "
                f"micro-batch {micro_batch} x {cfg.train.accumulate} accumulation x {world} = {cfg.data.batch_size})"
            )
            if checkpoints.is_sharding(fabric) and not task.blocks:
                print(f"{config.strategy_of(cfg.fabric)}: the task names no blocks, so the whole model is one unit")
    except BaseException:
        storage.unlock_folder(folder_lock)
        raise
    return run


def lr_schedule(cfg: RunConfig, total_steps: int):
    s = cfg.schedule
    return lambda step: learning_rate(
        step,
        s.kind,
        cfg.optim.lr,
        s.warmup_steps,
        s.total_steps or total_steps,
        s.min_lr_ratio,
        s.noam_scale,
        s.noam_d_model,
    )


def standard_hooks(run: Run) -> callbacks.Hooks:
    cfg = run.cfg
    return callbacks.merge(
        callbacks.throughput(),
        callbacks.monitoring(cfg.monitor, cfg.log.every),
        callbacks.curves(),
        callbacks.progress_bar(run.total_steps if run.total_steps < sys.maxsize else None)
        if cfg.log.progress_bar
        else {},
        run.task.hooks(cfg, run.datasets) if run.task.hooks else {},
    )


def fit(run: Run, hooks: callbacks.Hooks) -> bool:
    """The loop: optimizer steps until a limit or a stop request. False if stopped by a signal."""
    cfg, fabric, model, optimizer = run.cfg, run.fabric, run.model, run.optimizer
    accumulate, train_size = cfg.train.accumulate, data.size(run.datasets["train"])
    train_step, start_time = contract.checked_once(run), time.perf_counter()  # first return checked: no sync
    callbacks.call(hooks, "on_train_start", run)
    while not run.should_stop and run.step < run.total_steps:
        run.train_loader.sampler.start_epoch(run.epoch, skip_batches=run.step_in_epoch * accumulate)
        batches = iter(run.train_loader)
        while run.step_in_epoch < run.steps_per_epoch and run.step < run.total_steps and not run.should_stop:
            run.lr = run.lr_at(run.step)
            for group in optimizer.param_groups:
                group["lr"] = run.lr
            for micro in range(accumulate):
                waited = time.perf_counter()
                batch = data.to_device(next(batches), fabric.device)
                run.data_wait_s += time.perf_counter() - waited
                # With skip_sync, gradients are all-reduced only on the last micro-batch of the step.
                with fabric.no_backward_sync(model, enabled=run.skip_sync and micro < accumulate - 1):
                    loss, logged = train_step(cfg, model, batch, run.step, train_size)
                    if accumulate > 1:  # the mean over micro-batches (no extra op when there is one)
                        loss, logged = loss / accumulate, logged / accumulate
                    fabric.backward(loss)
                run.loss_sum += logged  # stays on the device
            skip = nonfinite.gradient_norms(run)
            callbacks.call(hooks, "after_backward", run)
            if not skip:
                if cfg.train.clip is not None:
                    run.clip(run.grad_norms)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.step += 1
            run.step_in_epoch += 1
            run.steps_since_log += 1
            end_of_epoch = run.step_in_epoch == run.steps_per_epoch
            if end_of_epoch:
                run.epoch, run.step_in_epoch = run.epoch + 1, 0

            if run.step % cfg.log.every == 0 or run.step == run.total_steps:
                log_training(run, hooks)
                if fabric.all_reduce(
                    torch.tensor(float(run.stop_signal), device=fabric.device), reduce_op="max"
                ).item():
                    preempt(run, hooks)
                    return False
                if cfg.train.max_time and fabric.broadcast(time.perf_counter() - start_time > cfg.train.max_time * 60):
                    fabric.print(f"max_time of {cfg.train.max_time} minutes reached at step {run.step}")
                    run.should_stop = True

            last_step = (
                run.step == run.total_steps
                or run.should_stop
                or (cfg.train.max_epochs is not None and run.epoch >= cfg.train.max_epochs)
            )
            validating = cfg.train.val_every is not None and (
                run.step % cfg.train.val_every == 0 or end_of_epoch or last_step
            )
            if validating:
                validate(run, hooks)
            elif cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0:
                checkpoints.save(run, run.run_dir / "checkpoints" / "last.ckpt")
            callbacks.call(hooks, "after_step", run)
            if end_of_epoch:
                break
        if cfg.train.max_epochs is not None and run.epoch >= cfg.train.max_epochs:
            break
    if run.steps_since_log:  # stopped early inside a log interval
        log_training(run, hooks)
    callbacks.call(hooks, "on_train_end", run)
    return True


def log_training(run: Run, hooks: callbacks.Hooks) -> None:
    """The loop's one host sync of a log interval: the mean training values since the last log and
    where a gradient first went non-finite (warn: say so; stop: save and exit)."""
    fabric = run.fabric
    bad = ~torch.isfinite(run.norm_rows[: run.rows_used])
    if run.sharded:  # a layer is bad if any rank's shard is
        bad = fabric.all_reduce(bad.float(), reduce_op="max") > 0
    if not bad.numel():
        bad = torch.zeros(1, dtype=torch.bool, device=fabric.device)
    means = fabric.all_reduce(run.loss_sum, reduce_op="mean") / run.steps_since_log
    *means, bad_gradient, first_bad = torch.cat(
        [means.float(), bad.any().float()[None], bad.flatten().int().argmax().float()[None]]
    ).tolist()
    used, interval, run.rows_used, run.steps_since_log = run.rows_used, run.steps_since_log, 0, 0
    run.loss_sum.zero_()
    run.loss_before.zero_()
    nonfinite.judge(run, means, bool(bad_gradient), int(first_bad), used, interval)
    run.log_row = {f"train/{name}": value for name, value in zip(run.train_fields, means)}
    if run.task.scheduled:
        run.log_row.update({f"schedule/{k}": v for k, v in run.task.scheduled(run.cfg, run.step).items()})
    run.log_row.update({"train/lr": run.lr, "train/epoch": run.epoch})
    callbacks.call(hooks, "on_log", run)  # each hook's values join the row, for the hooks after it
    run.data_wait_s = 0.0
    if run.loggers:
        run.loggers.log(run.log_row, run.step)


def validate(run: Run, hooks: callbacks.Hooks) -> None:
    """Evaluate on val, log, write step-N.ckpt (keeping the best k, last.ckpt pointing at it) and
    count validations without improvement for early stopping."""
    cfg, (monitor, mode) = run.cfg, run.monitor
    metrics, histograms = evaluation.evaluate(run.fabric, cfg, run.task, run.model, run.eval_loaders["val"])
    distributed.reshard(run.model)
    run.val_metrics = {f"val/{k}": float(v) for k, v in metrics.items()}  # numpy scalars too: checkpoints hold data
    if run.loggers:
        run.loggers.log(run.val_metrics, run.step)
        if histograms:
            run.loggers.log_histograms(histograms, run.step)
    score = run.val_metrics[monitor]
    checkpoints.save_ranked(run, score, mode)
    if cfg.train.early_stop_patience:
        if callbacks.improved(score, run.early_stop_best, mode, cfg.train.early_stop_min_delta):
            run.early_stop_best, run.bad_validations = score, 0
        else:
            run.bad_validations += 1
            if run.bad_validations >= cfg.train.early_stop_patience:
                run.fabric.print(f"early stopping: {monitor} has not improved for {run.bad_validations} validations")
                run.should_stop = True
    callbacks.call(hooks, "on_validation_end", run)


def stop_on_signals(run: Run) -> None:
    """Ctrl-C (SIGINT), SIGTERM and SIGUSR1 (SLURM's warning before preemption) ask for a checkpoint and a clean
    exit at the next log interval, taken by every rank together; a second signal exits at once."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        if run.stop_signal:
            print(f"{signal.Signals(signum).name} again: exiting at once", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)  # the shell's code for a process ended by that signal
        run.stop_signal = signum
        print(f"{signal.Signals(signum).name} received: saving a checkpoint at the next log interval", flush=True)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # Ctrl-C, a scheduler's stop, SLURM's warning


def preempt(run: Run, hooks: callbacks.Hooks) -> None:
    """Save last.ckpt (every rank takes part) and say how to resume."""
    callbacks.call(hooks, "on_train_end", run)
    checkpoints.save(run, run.run_dir / "checkpoints" / "last.ckpt")
    if run.loggers:
        run.loggers.finish()
    # the run as it was configured: its config.json holds every value, flags included
    config_file = str(run.run_dir / "config.json")
    again = shlex.join(["--config", config_file, "--run-name", run.run_dir.name, "--resume", "auto"])
    run.fabric.print(
        f"stopped at step {run.step} on a signal; checkpoint {run.run_dir / 'checkpoints' / 'last.ckpt'}; "
        f"resume with: {run.resume_command} {again}"
    )


def test(run: Run, hooks: callbacks.Hooks | None = None) -> dict[str, float]:
    """Test once, on the best checkpoint by the monitored validation metric (the final weights if none); then
    the hooks' on_test_end (a task's pictures of the tested model) before the loggers close."""
    fabric = run.fabric
    if best := checkpoints.best_finite(run.best):
        best_path = run.run_dir / "checkpoints" / best[1]
        checkpoints.load(fabric, best_path, {"model": run.model}, strict=False)
        fabric.print(f"testing the best checkpoint: {best_path.name} ({run.monitor[0]} {best[0]:.4f})")
    elif run.best:
        fabric.print(f"no validation gave a finite {run.monitor[0]}: testing the final weights")
    metrics, _ = evaluation.evaluate(fabric, run.cfg, run.task, run.model, run.eval_loaders["test"])
    distributed.reshard(run.model)
    callbacks.call(hooks or {}, "on_test_end", run)
    error = None
    if fabric.is_global_zero:
        title, rows = evaluation.report(run.task, run.cfg, metrics)
        tools.print_table(f"test metrics ({title})", rows)
        tested = {f"test/{k}": v for k, v in metrics.items()}
        try:
            (run.run_dir / "test_metrics.json").write_text(json.dumps(tested, indent=2))
        except OSError as exc:
            error = f"error: cannot write {run.run_dir / 'test_metrics.json'} ({exc}); the metrics are above"
        if run.loggers:
            run.loggers.summary(tested)
            run.loggers.finish()
    distributed.stop_together(fabric, error)
    return metrics


def train(cfg: RunConfig, task: Task, resume_command: str = "python train.py") -> dict[str, float] | None:
    cfg = config.for_task(cfg, task)
    config.check(cfg, task)
    with as_found():
        run = setup(cfg, task, resume_command)
        try:
            contract.check_evaluation(run)
            hooks = standard_hooks(run)
            if not fit(run, hooks):
                return None  # stopped by a signal, last.ckpt written
            return test(run, hooks)
        finally:
            storage.unlock_folder(run.folder_lock)


@contextlib.contextmanager
def as_found():
    """A run called from a notebook or another program leaves it as it found it: its SIGINT/SIGTERM/SIGUSR1 handlers
    and its warning filters (a run silences a few warnings it knows to be noise) come back afterwards."""
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    with warnings.catch_warnings():
        try:
            yield
        finally:
            if threading.current_thread() is threading.main_thread():
                for signum, handler in handlers.items():
                    signal.signal(signum, handler)


def open_loggers(cfg: RunConfig, task: Task, run_dir: Path, resume_step: int | None):
    import loggers

    return loggers.make_loggers(
        cfg.log.logger,
        run_dir,
        cfg.log.project,
        cfg.log.wandb_mode,
        configfile.to_dict(cfg),
        resume_step,
        summaries=dict(task.metrics),
    )


def lr_find(args: tools.LRFindArgs, task: Task, resume_command: str) -> float:
    """The learning-rate range test on the ordinary loop: logging every step, the LR set by the test,
    no validation, checkpoints or tracker; the lr_range hook records the curve and stops on divergence."""
    cfg = config.for_task(args.run, task)
    cfg = dataclasses.replace(
        cfg,
        resume=None,
        init_from=None,
        train=dataclasses.replace(
            cfg.train, max_steps=args.steps, max_epochs=None, max_time=None, val_every=None, early_stop_patience=None
        ),
        schedule=dataclasses.replace(cfg.schedule, kind="constant", warmup_steps=0),
        log=dataclasses.replace(cfg.log, every=1, logger="none", progress_bar=False),
        monitor=dataclasses.replace(cfg.monitor, histogram_every=None, norms=False, on_nonfinite="warn"),
    )
    if args.steps < 2:
        raise ConfigError(f"steps: expected at least 2 steps for a range of learning rates, got {args.steps}")
    config.check(cfg, task)
    if not 0 <= args.smoothing < 1:
        raise ConfigError(f"smoothing: expected a value in [0, 1) (0 = none), got {args.smoothing}")
    if not args.diverge > 1:
        raise ConfigError(f"diverge: expected a multiple of the minimum loss above 1, got {args.diverge}")
    if not 0 < args.lr_min < args.lr_max <= 1e30:
        raise ConfigError(f"lr_min/lr_max: expected 0 < lr_min < lr_max <= 1e30, got {args.lr_min}, {args.lr_max}")
    name = f"lr-find-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    with as_found():
        # never an existing run's folder, nor another lr-find's of the same second (rank 0's choice is broadcast)
        run = setup(cfg, task, resume_command, fresh_name=name)
        try:
            run.lr_at = args.lr_at
            result = {}
            fit(run, tools.lr_range(args, run.run_dir, result))
        finally:
            storage.unlock_folder(run.folder_lock)
    return result["suggestion"]


def parse_args(argv: list[str]) -> RunConfig:
    """The training config from the command line."""
    return cli.parse(argv)[2]


def main(argv: list[str], task: Task | None = None) -> int:
    """`train.py [TASK] [TOOL] [--config FILE] [flags]`; a task file calls main(sys.argv[1:], task=TASK)."""
    if argv and argv[0].endswith(".py") and (clash := shadowing(Path(argv[0]).parent)):
        return tools.fail(clash)
    try:
        task, tool, parsed, prog = cli.parse(argv, task)
        if tool is None:
            train(parsed, task, f"python {prog}")
        elif tool == "evaluate":
            with as_found():
                tools.evaluate(parsed, task)
        elif tool == "lr-find":
            lr_find(parsed, task, f"python {prog}")
        elif tool == "export-checkpoint":
            tools.export_checkpoint(parsed)
        elif tool == "convert-checkpoint":
            tools.convert_checkpoint(parsed)
        else:
            print(tools.export_config(parsed))
    except ConfigError as exc:
        code = tools.fail(f"error: {exc}")
    except SystemExit as exc:  # a one-line error from deeper down (a damaged file, a full disk, a non-finite stop)
        if isinstance(exc.code, str):
            code = tools.fail(exc.code)
        elif exc.code == 2:  # another rank failed and said so; this one stops with it, quietly
            code = 2
        else:
            raise
    except KeyboardInterrupt:  # Ctrl-C before the run's own handler is in place (or in a tool): nothing to save
        code = tools.fail("interrupted") + 128
    else:
        code = 0
    # Out of the except blocks, the failed run's frames are gone: the process group can go without racing exit.
    distributed.shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
