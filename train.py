"""kibitz: train a network with an explicit Lightning Fabric loop.

    python train.py                       # the chess evaluator on the bundled sample; `--help`: tasks, tools, options
    python train.py chess --resume auto   # continue the newest run from its last checkpoint
    python examples/charlm.py             # a task in a file of its own, through the same loop

Read top to bottom: `setup` builds the Run, `fit` is the loop, `train` is setup, fit, then a test of the best
checkpoint. The task (config.Task) supplies the model, data, step and evaluation; hooks (callbacks.py) observe, and
may ask the loop to stop. The same script runs under `fabric run`, torchrun and SLURM."""

import datetime
import functools
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASK_MODULES = {"model", "losses"}  # the built-in tasks' own: a task's own may shadow them


def shadowing(folder: Path) -> str | None:
    """A task folder's module or package named like one of the trainer's (config.py, data.py, kibitz/): the task's
    folder comes first on the import path, so one would be imported in the other's place. The message, or None."""
    folder = folder.resolve()
    if folder == HERE:
        return None
    theirs = [*folder.glob("*.py"), *(init.parent for init in folder.glob("*/__init__.py"))]
    for path in sorted(theirs):
        ours = HERE / path.name
        if ours.exists() and path.stem not in TASK_MODULES:
            return (
                f"error: task: {path} has the name of the trainer's {ours}: one would be imported in the other's "
                f"place; rename yours (say my_{path.name})"
            )
    return None


def one_line_if_uncaught(clash: str) -> None:
    """A script that imports train and does not catch the ImportError below ends with its one line, exit code 2."""
    previous = sys.excepthook

    def hook(kind, value, traceback) -> None:
        if isinstance(value, ImportError) and str(value) == clash:
            sys.stderr.write(clash + "\n")
            sys.stderr.flush()
            os._exit(2)
        previous(kind, value, traceback)

    sys.excepthook = hook


# Checked before the trainer's own imports, which a task folder's config.py would otherwise replace. An error, not an
# exit: a notebook's kernel, or a caller that catches it, goes on.
if __name__ != "__main__" and sys.path and (clash := shadowing(Path(sys.path[0] or "."))):
    one_line_if_uncaught(clash)
    raise ImportError(clash)

import torch
from lightning_fabric import Fabric

import callbacks
import config
import data
import schedules
from config import ConfigError, RunConfig, Task
from kibitz import checkpoints, cli, contract, distributed, evaluation, monitor, nonfinite, runs, storage, tools
from kibitz.tracking import loggers


@dataclass
class LogWindow:
    """What the loop gathers on the device between two logs, read in one transfer at the log, then emptied."""

    sums: torch.Tensor  # what train_step logs (Run.train_fields, the loss first), summed over the interval
    sums_before_step: torch.Tensor  # under --monitor.on-nonfinite skip: the sums before this step, to drop it
    norm_rows: torch.Tensor  # each step's per-layer gradient norms, read at the log for a non-finite one
    rows_used: int = 0
    steps: int = 0
    data_wait_s: float = 0.0  # host time spent waiting for batches


@dataclass
class Run:
    """What the loop works with: the Fabric objects and the data, where the loop is (`progress`, what a checkpoint
    saves) and what the next log reads (`window`). The trainer's modules write it (the loop, checkpoints,
    monitoring); hooks see it only through `view`, read-only."""

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
    params: list  # the trained parameters in the optimizer's order, and their names
    param_names: list
    sharded: bool  # FSDP or FSDP2: each rank holds a part of every parameter; statistics are combined
    rank_by: tuple[str, str]  # the validation metric that ranks checkpoints, and min or max
    resume_command: str
    progress: checkpoints.Progress
    window: LogWindow
    loggers: object = None  # rank 0's
    folder_lock: object = None  # rank 0's, for the whole run: one writer per run folder
    train_fields: tuple = ("loss",)  # the names of what train_step logs (the loss first), fixed at its first call
    lr: float = 0.0
    grad_norms: torch.Tensor | None = None  # this step's per-parameter gradient norms (optimizer order)
    stop_signal: int = 0  # SIGINT / SIGTERM / SIGUSR1 received: save and stop at the next log interval
    phase: str = "train"  # or "validate", "test": what a signal stops
    should_stop: bool = False  # a limit reached, early stopping, or a hook's request
    log_row: dict = field(default_factory=dict)
    val_metrics: dict = field(default_factory=dict)

    @property
    def view(self) -> callbacks.RunView:  # what hooks get
        return callbacks.RunView(self)


def make_optimizer(model: torch.nn.Module, cfg: config.OptimConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (biases and norms are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def setup(fabric: Fabric, cfg: RunConfig, task: Task, resume_command: str, fresh_name: str | None = None) -> Run:
    """On each process: data, model and optimizer (in Fabric's order), the run folder, a resumed state."""
    storage.write_directly(fabric)
    if fabric.device.type == "cuda":
        torch.set_float32_matmul_precision(cfg.fabric.matmul_precision)
    micro_batch = data.micro_batch_size(cfg, fabric.world_size)
    if task.prepare_data:  # built once if missing (rank 0 of each node first), then read by every rank
        with fabric.rank_zero_first(local=True):
            task.prepare_data(cfg)
    datasets = contract.call(task, "datasets", cfg)
    contract.check_datasets(task, datasets, cfg.data.on_device)
    train_loader, eval_loaders, steps_per_epoch = data.make_loaders(fabric, cfg, task, datasets, micro_batch)

    # Model, then compile, then Fabric's wrappers, then the optimizer over the wrapped parameters. Seeded here, after
    # the data: whatever preparing or loading it drew (a task's random split, say), whether or not this process
    # prepared it, the weights and every later draw are the same on every rank and in every run with this seed.
    fabric.seed_everything(cfg.train.seed)
    model = contract.call(task, "build_model", cfg)
    contract.check_model(task, model)
    model = fabric.setup_module(torch.compile(model) if cfg.train.compile else model)
    optimizer = fabric.setup_optimizers(make_optimizer(model, cfg.optim, fused=fabric.device.type == "cuda"))
    if fabric.global_rank:  # the weights are drawn: from here each rank draws its own numbers (masks, noise);
        fabric.seed_everything(cfg.train.seed + fabric.global_rank, verbose=False)  # rank 0 keeps one process's
    name_of = {id(p): n for n, p in distributed.unwrapped(model).named_parameters()}
    named = [(name_of[id(p)], p) for g in optimizer.param_groups for p in g["params"] if id(p) in name_of]
    total_steps = schedules.step_limit(cfg, steps_per_epoch)
    run_dir, resume_from, folder_lock = runs.open_run_folder(fabric, cfg, fresh_name)
    try:  # a failure from here on releases the run folder at once (a notebook may start another run)
        fields = 1  # the loss; train_step's first call may add the values it logs
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
            schedules.lr_function(cfg.schedule, cfg.optim.lr, total_steps),
            [p for _, p in named],
            [n for n, _ in named],
            checkpoints.is_sharding(fabric),
            config.ranking_metric(cfg, task),
            resume_command,
            checkpoints.Progress(),
            LogWindow(
                torch.zeros(fields, device=fabric.device),
                torch.zeros(fields, device=fabric.device),
                torch.empty(cfg.log.every, len(named), device=fabric.device),
            ),
            folder_lock=folder_lock,
        )
        if cfg.resume is not None and checkpoints.restore(run, resume_from):
            run.window.sums_before_step = run.window.sums.clone()
        elif cfg.init_from:  # fine-tuning: the weights only, a fresh optimizer and counters (and with --resume auto,
            source = runs.resolve_source(cfg.init_from, cfg.out_dir)[0]  # the first start; the later ones resume)
            checkpoints.init_weights(run, source, cfg.init_from)
        distributed.stop_on_signals(run)
        runs.write_run_folder(fabric, cfg, run_dir)
        if fabric.is_global_zero:
            run.loggers = loggers.open_for(fabric, cfg, task, run_dir, run.progress.step if cfg.resume else None)
            announce(run, micro_batch)
    except BaseException:
        runs.unlock_folder(folder_lock)
        raise
    return run


def announce(run: Run, micro_batch: int) -> None:
    """Rank 0's first line: where the run is, on what, and how its batch is split."""
    cfg, world = run.cfg, run.fabric.world_size
    print(
        f"run folder: {run.run_dir}  ({world} process{'es' if world > 1 else ''}, {run.fabric.device}, "
        f"micro-batch {micro_batch} x {cfg.train.accumulate} accumulation x {world} = {cfg.data.batch_size})"
    )
    if run.sharded and not run.task.blocks:
        print(f"{config.strategy_of(cfg.fabric)}: the task names no blocks, so the whole model is one unit")


def standard_hooks(run: Run) -> callbacks.Hooks:
    cfg = run.cfg
    bar = callbacks.progress_bar(run.total_steps if run.total_steps < sys.maxsize else None)
    task_hooks = run.task.hooks(cfg, run.datasets) if run.task.hooks else {}
    own = (callbacks.throughput(), monitor.hooks(cfg.monitor, cfg.log.every), callbacks.curves())
    return callbacks.merge(*own, bar if cfg.log.progress_bar else {}, task_hooks)


def fit(run: Run, hooks: callbacks.Hooks) -> bool:
    """The loop: optimizer steps until a limit or a stop request, one function a level (the epoch's batches, a step,
    the log, the validation). False if stopped by a signal."""
    take_step, start_time, batches = stepper(run, hooks), time.perf_counter(), None
    callbacks.call(hooks, "on_train_start", run)
    while not run.should_stop and run.progress.step < run.total_steps:
        if batches is None:
            batches = epoch_batches(run)
        end_of_epoch = take_step(batches)
        callbacks.call(hooks, "after_step", run)  # a stop it asks for makes this step the last: validated, saved
        if is_log_step(run, run.progress.step) and not log_and_listen(run, hooks, start_time):
            preempt(run, hooks)
            return False
        validate_or_save(run, hooks, end_of_epoch)
        if end_of_epoch:
            batches = None
            if epochs_reached(run):
                break
    if run.window.steps:  # stopped early inside a log interval
        log_training(run, hooks)
    callbacks.call(hooks, "on_train_end", run)
    return True


def epoch_batches(run: Run):
    """The training batches of the current epoch, from where the run is in it (a resumed run skips what it saw)."""
    skip = run.progress.step_in_epoch * run.cfg.train.accumulate
    run.train_loader.sampler.start_epoch(run.progress.epoch, skip_batches=skip)
    return iter(run.train_loader)


def stepper(run: Run, hooks: callbacks.Hooks):
    """One optimizer step, as a function of the epoch's batches returning whether the epoch ended; what it needs is
    looked up once here, not at every step."""
    cfg, fabric, model, optimizer = run.cfg, run.fabric, run.model, run.optimizer
    progress, window = run.progress, run.window  # where the loop is; what the next log reads
    accumulate, train_size, device = cfg.train.accumulate, data.size(run.datasets["train"]), fabric.device
    skip_sync = skips_grad_sync(run)
    clip = distributed.gradient_clipper(fabric, model, optimizer, cfg.train.clip)

    def first_train_step(*args):  # checked (contract.py); it fixes the names logged and the form of the later calls
        nonlocal train_step
        result = contract.checked_train_step(run, *args)
        if isinstance(result, tuple):
            train_step = functools.partial(loss_and_values, run.task, tuple(result[1]))
        else:
            train_step = functools.partial(loss_alone, run.task)
        return logged_values(result)

    train_step = first_train_step

    def take_step(batches) -> bool:
        run.lr = run.lr_at(progress.step)
        for group in optimizer.param_groups:
            group["lr"] = run.lr
        for micro in range(accumulate):
            waited = time.perf_counter()
            batch = to_device(next(batches), device)
            window.data_wait_s += time.perf_counter() - waited
            # With skip_sync, gradients are all-reduced only on the last micro-batch of the step.
            with fabric.no_backward_sync(model, enabled=skip_sync and micro < accumulate - 1):
                loss, logged = train_step(cfg, model, batch, progress.step, train_size)
                if accumulate > 1:  # the mean over micro-batches (no extra op when there is one)
                    loss, logged = loss / accumulate, logged / accumulate
                fabric.backward(loss)
            window.sums += logged  # stays on the device
        skip = take_gradient_norms(run)
        callbacks.call(hooks, "after_backward", run)
        if is_log_step(run, progress.step + 1):
            callbacks.call(hooks, "before_log_update", run)
        if not skip:
            if cfg.train.clip is not None:
                clip(run.grad_norms)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return advance(run)

    return take_step


def skips_grad_sync(run: Run) -> bool:
    """Whether gradients are all-reduced only on a step's last micro-batch: by default, but under FSDP, which needs
    whole gradients."""
    chosen = run.cfg.train.skip_grad_sync
    return not run.sharded if chosen is None else chosen


def loss_alone(task: Task, *args) -> tuple[torch.Tensor, torch.Tensor]:
    loss = task.train_step(*args)
    if not isinstance(loss, torch.Tensor):  # one form for the run: the first call's (a type check, no sync)
        raise config.FormChanged(
            "train_step", f"returned the loss alone at its first call, then {contract.describe_step(loss)}"
        )
    return loss, loss.detach()


def loss_and_values(task: Task, names: tuple, *args) -> tuple[torch.Tensor, torch.Tensor]:
    result = task.train_step(*args)
    if not (isinstance(result, tuple) and len(result) == 2 and tuple(result[1]) == names):
        raise config.FormChanged(
            "train_step", f"logged {list(names)} at its first call, then {contract.describe_step(result)}"
        )
    return logged_values(result)


def logged_values(result) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss, and what train_step logs as one tensor on the device (the loss first): no sync."""
    if not isinstance(result, tuple):
        return result, result.detach()
    loss, logged = result
    values = [torch.as_tensor(v, device=loss.device).detach().float().reshape(()) for v in logged.values()]
    return loss, torch.stack([loss.detach().float(), *values])


def advance(run: Run) -> bool:
    """Count the step taken; True when it ended the epoch."""
    progress = run.progress
    progress.step += 1
    progress.step_in_epoch += 1
    run.window.steps += 1
    if progress.step_in_epoch < run.steps_per_epoch:
        return False
    progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
    return True


def is_log_step(run: Run, step: int) -> bool:
    return step % run.cfg.log.every == 0 or step == run.total_steps


def log_and_listen(run: Run, hooks: callbacks.Hooks, start_time: float) -> bool:
    """The log, then what the ranks decide together at it: a signal received (False: stop now) and the time limit.
    Only here, as a check at every step would cost a sync across ranks."""
    fabric = run.fabric
    log_training(run, hooks)
    if fabric.all_reduce(torch.tensor(float(run.stop_signal), device=fabric.device), reduce_op="max").item():
        return False
    max_time = run.cfg.train.max_time
    if max_time and fabric.broadcast(time.perf_counter() - start_time > max_time * 60):
        fabric.print(f"max_time of {max_time} minutes reached at step {run.progress.step}")
        run.should_stop = True
    return True


def validate_or_save(run: Run, hooks: callbacks.Hooks, end_of_epoch: bool) -> None:
    """Validate (and save the ranked checkpoints) every `val_every` steps, at an epoch's end and after the last
    step; without validation, save last.ckpt every `checkpoint.every` steps."""
    cfg, step = run.cfg, run.progress.step
    last_step = step == run.total_steps or run.should_stop or epochs_reached(run)
    if cfg.train.val_every is not None and (step % cfg.train.val_every == 0 or end_of_epoch or last_step):
        validate(run, hooks)
    elif cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
        checkpoints.save(run, run.run_dir / "checkpoints" / "last.ckpt")


def epochs_reached(run: Run) -> bool:
    return run.cfg.train.max_epochs is not None and run.progress.epoch >= run.cfg.train.max_epochs


def to_device(batch, device: torch.device):
    """A batch on the device, its structure kept: tuples of tensors directly (the hot path), others by Fabric."""
    if type(batch) in (tuple, list) and all(torch.is_tensor(t) for t in batch):
        return [t.to(device, non_blocking=True) for t in batch]
    from lightning_fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


def take_gradient_norms(run: Run) -> bool:
    """This step's per-layer gradient norms, kept on the device: the clip reuses them and the next log reads the
    interval's rows for a non-finite one (two ops, no sync). True: drop this step (only under on-nonfinite skip)."""
    grads = [distributed.local(p.grad if p.grad is not None else torch.zeros_like(p)) for p in run.params]
    if run.cfg.monitor.on_nonfinite == "skip":
        run.grad_norms = torch.stack(torch._foreach_norm(grads))
        return nonfinite.skip_this_step(run)
    window = run.window
    if window.rows_used == len(window.norm_rows):  # a longer interval than log.every (a resumed run): grow
        window.norm_rows = torch.cat([window.norm_rows, torch.empty_like(window.norm_rows)])
    run.grad_norms = torch.stack(torch._foreach_norm(grads), out=window.norm_rows[window.rows_used])
    window.rows_used += 1
    return False


def log_training(run: Run, hooks: callbacks.Hooks) -> None:
    """The loop's one host sync of a log interval: the mean training values since the last log and
    where a gradient first went non-finite (warn: say so; stop: save and exit)."""
    fabric, window = run.fabric, run.window
    bad = ~torch.isfinite(window.norm_rows[: window.rows_used])
    if run.sharded:  # a layer is bad if any rank's part of it is (and every rank must stop together)
        bad = nonfinite.on_any_rank(fabric, bad)
    if not bad.numel():
        bad = torch.zeros(1, dtype=torch.bool, device=fabric.device)
    means = fabric.all_reduce(window.sums, reduce_op="mean") / window.steps
    *means, bad_gradient, first_bad = torch.cat(
        [means.float(), bad.any().float()[None], bad.flatten().int().argmax().float()[None]]
    ).tolist()
    used, interval, window.rows_used, window.steps = window.rows_used, window.steps, 0, 0
    window.sums.zero_()
    window.sums_before_step.zero_()
    nonfinite.warn_or_stop(run, means, bool(bad_gradient), int(first_bad), used, interval)
    run.log_row = {f"train/{name}": value for name, value in zip(run.train_fields, means)}
    if run.task.scheduled:
        run.log_row.update({f"schedule/{k}": v for k, v in run.task.scheduled(run.cfg, run.progress.step).items()})
    run.log_row.update({"train/lr": run.lr, "train/epoch": run.progress.epoch})
    callbacks.call(hooks, "on_log", run)  # each hook's values join the row, for the hooks after it
    window.data_wait_s = 0.0
    if run.loggers:
        run.loggers.log(run.log_row, run.progress.step)


def validate(run: Run, hooks: callbacks.Hooks) -> None:
    """Evaluate on val, log, write step-N.ckpt (keeping the best k, last.ckpt pointing at it) and
    count validations without improvement for early stopping."""
    cfg, progress, (metric, mode) = run.cfg, run.progress, run.rank_by
    run.phase = "validate"
    try:
        metrics, histograms = evaluation.evaluate(run.fabric, cfg, run.task, run.model, run.eval_loaders["val"])
    finally:
        run.phase = "train"
    run.val_metrics = {f"val/{k}": float(v) for k, v in metrics.items()}  # numpy scalars too: checkpoints hold data
    if run.loggers:
        run.loggers.log(run.val_metrics, progress.step)
        if histograms:
            run.loggers.log_histograms(histograms, progress.step)
    score = run.val_metrics[metric]
    checkpoints.save_ranked(run, score, mode)
    if cfg.train.early_stop_patience:
        if callbacks.improved(score, progress.early_stop_best, mode, cfg.train.early_stop_min_delta):
            progress.early_stop_best, progress.bad_validations = score, 0
        else:
            progress.bad_validations += 1
            if progress.bad_validations >= cfg.train.early_stop_patience:
                run.fabric.print(f"early stopping: {metric} has not improved in {progress.bad_validations} validations")
                run.should_stop = True
    callbacks.call(hooks, "on_validation_end", run)


def preempt(run: Run, hooks: callbacks.Hooks) -> None:
    """Save last.ckpt (every rank takes part) and say how to resume the run as configured (its config.json)."""
    callbacks.call(hooks, "on_train_end", run)
    last = run.run_dir / "checkpoints" / "last.ckpt"
    checkpoints.save(run, last)
    if run.loggers:
        run.loggers.finish("KILLED")  # until the run resumes
    run.fabric.print(
        f"stopped at step {run.progress.step} on a signal; checkpoint {last}; resume with: {run.resume_command} "
        f"{resume_flags(run)}"
    )


def test(run: Run, hooks: callbacks.Hooks | None = None) -> dict[str, float]:
    """Test once, on the best checkpoint by the ranking validation metric (the final weights if none); then
    the hooks' on_test_end (a task's pictures of the tested model) before the loggers close."""
    fabric, run.phase = run.fabric, "test"
    if best := checkpoints.best_finite(run.progress.best):
        best_path = run.run_dir / "checkpoints" / best[1]
        try:  # strict: the run's own checkpoint of this model, every tensor of it must fit
            checkpoints.load(fabric, best_path, {"model": run.model})
        except Exception as exc:
            raise SystemExit(f"error: {best_path}: cannot test it ({checkpoints.reason(exc)})") from None
        fabric.print(f"testing the best checkpoint: {best_path.name} ({run.rank_by[0]} {best[0]:.4f})")
    elif run.progress.best:
        fabric.print(f"no validation gave a finite {run.rank_by[0]}: testing the final weights")
    metrics, _ = evaluation.evaluate(fabric, run.cfg, run.task, run.model, run.eval_loaders["test"])
    callbacks.call(hooks or {}, "on_test_end", run)
    error = None
    if fabric.is_global_zero:
        title, rows = evaluation.report(run.task, run.cfg, metrics)
        tools.print_table(f"test metrics ({title})", rows)
        tested = {f"test/{k}": v for k, v in metrics.items()}
        try:
            storage.write_atomic(run.run_dir / "test_metrics.json", json.dumps(tested, indent=2))
        except OSError as exc:
            error = f"error: cannot write {run.run_dir / 'test_metrics.json'} ({exc}); the metrics are above"
        if run.loggers:
            run.loggers.summary(tested)
            run.loggers.finish()
    distributed.stop_together(fabric, error)
    return metrics


def train(cfg: RunConfig, task: Task, resume_command: str = "python train.py") -> runs.Trained | None:
    """Train, test the best checkpoint: its metrics and the run folder (None: stopped by a signal, resumable)."""
    cfg = config.for_task(cfg, task)
    config.check(cfg, task)
    return distributed.launched(cfg, task.blocks, functools.partial(train_on, cfg, task, resume_command))


def train_on(cfg: RunConfig, task: Task, command: str, fabric: Fabric) -> runs.Trained | None:
    run = setup(fabric, cfg, task, command)
    with runs.held(run):
        contract.check_evaluation(run)
        hooks = standard_hooks(run)
        try:  # one try around the loop: a mistake in the task's code at any step is one line, at no cost to a step
            if not fit(run, hooks):
                return None  # stopped by a signal, last.ckpt written
            return runs.Trained(test(run, hooks), run.run_dir)
        except distributed.ValidationStopped:
            preempt(run, hooks)
            return None
        except Exception as exc:
            if (mistake := contract.blame(run, exc)) is None:
                raise  # the trainer's own error: its traceback is for us
            raise SystemExit(f"error: {mistake}; {kept(run)}") from None


def kept(run: Run) -> str:
    """What a failed run leaves: its checkpoints, and the command that resumes it once the mistake is mended."""
    if not any((run.run_dir / "checkpoints").glob("*.ckpt")):
        return "no checkpoint had been written"
    return f"its checkpoints are kept; once mended, resume with: {run.resume_command} {resume_flags(run)}"


def resume_flags(run: Run) -> str:
    """The flags that resume this run as it was configured (its config.json, its folder)."""
    return shlex.join(
        ["--config", str(run.run_dir / "config.json"), "--run-name", run.run_dir.name, "--resume", "auto"]
    )


def lr_find(args: tools.LRFindArgs, task: Task, resume_command: str) -> float:
    """The learning-rate range test on the ordinary loop (tools.lr_find_config: logging every step, no validation,
    checkpoints or tracker), the LR set by the test; the lr_range hook records the curve and stops on divergence."""
    cfg = tools.lr_find_config(args, task)
    config.check(cfg, task)
    return distributed.launched(cfg, task.blocks, functools.partial(lr_find_on, cfg, task, args, resume_command))


def lr_find_on(cfg: RunConfig, task: Task, args: tools.LRFindArgs, command: str, fabric: Fabric) -> float:
    # never an existing run's folder, nor another lr-find's of the same second (rank 0's choice is broadcast)
    run = setup(fabric, cfg, task, command, fresh_name=f"lr-find-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    with runs.held(run):
        run.lr_at = args.lr_at
        result = {}
        fit(run, tools.lr_range(args, run.run_dir, result))
        if run.loggers:  # MLflow: the curve's steps and lr_find.png
            run.loggers.finish()
    return result["suggestion"]


def main(argv: list[str], task: Task | None = None) -> int:
    """`train.py [TASK] [TOOL] [--config FILE] [flags]`; a task file calls main(sys.argv[1:], task=TASK)."""
    if argv and argv[0].endswith(".py") and (clash := shadowing(Path(argv[0]).parent)):
        return tools.fail(clash)
    try:
        task, tool, parsed, prog = cli.parse(argv, task)
        if tool is None:
            train(parsed, task, f"python {prog}")
        elif tool == "lr-find":
            lr_find(parsed, task, f"python {prog}")
        else:
            with distributed.caller_state_kept():
                tools.run_tool(tool, parsed, task)
        code = 0
    except (ConfigError, SystemExit, KeyboardInterrupt) as exc:
        code = tools.exit_code(exc)
    # Out of the except blocks, the failed run's frames are gone: the process group can go without racing exit.
    distributed.shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
