"""kibitz: train a network with an explicit Lightning Fabric loop.

    python train.py                       # the chess evaluator on the bundled sample
    python train.py dvae                  # the discrete VAE of boards on the same sample
    python train.py chess --help          # every option
    python train.py chess --fabric.devices 2 --train.max-steps 5000
    python train.py chess --config runs/chess-.../config.json --optim.lr 3e-4
    python train.py chess --resume auto   # continue the newest run from its last checkpoint
    python train.py chess evaluate --ckpt runs/.../checkpoints/last.ckpt   # also: lr-find, export-config

The same script runs under `fabric run`, torchrun and SLURM: configs default to "auto" so the
launcher's settings apply.
"""

import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro
from lightning_fabric import Fabric

import callbacks
import checkpoints
import config
import data
from config import ConfigError, RunConfig
from schedules import learning_rate
from tasks import TASKS, Task


@dataclass
class Run:
    """Everything the loop and the hooks share. The counters are what a checkpoint restores."""

    fabric: Fabric
    cfg: RunConfig
    task: Task
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    run_dir: Path
    loggers: object
    total_steps: int
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps taken in the current epoch (the position inside it)
    lr: float = 0.0
    best: list = field(default_factory=list)  # [(score, checkpoint file name)], best first
    early_stop_best: float | None = None
    bad_validations: int = 0
    should_stop: bool = False
    validated_this_step: bool = False
    loss_sum: torch.Tensor | None = None  # task.train_fields (loss first) summed on the device since the last log
    steps_since_log: int = 0
    data_wait_s: float = 0.0  # host time spent waiting for batches since the last log
    skip_step: bool = False  # the non-finite guard drops this optimizer step
    grad_norms: torch.Tensor | None = None  # this step's per-parameter gradient norms (optimizer order), if taken
    stop_signal: int = 0  # SIGTERM / SIGUSR1 received: save and stop at the next log interval
    log_row: dict = field(default_factory=dict)
    val_metrics: dict = field(default_factory=dict)

    def progress(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "best": self.best,
                "early_stop_best": self.early_stop_best, "bad_validations": self.bad_validations,
                "loss_sum": self.loss_sum.clone(), "steps_since_log": self.steps_since_log}


def make_fabric(cfg: config.FabricConfig, blocks: tuple[type, ...] = (), sharded_checkpoints: bool = False) -> Fabric:
    """Pass Fabric only what the user set: under `fabric run` a value that differs from the
    launcher's is an error, and under torchrun the device count comes from its environment."""
    strategy = config.strategy_of(cfg)
    kwargs = {"accelerator": cfg.accelerator, "strategy": strategy}
    if cfg.devices != "auto":
        kwargs["devices"] = int(cfg.devices) if cfg.devices.lstrip("-").isdigit() else cfg.devices
    elif "LOCAL_WORLD_SIZE" in os.environ and os.environ.get("LT_CLI_USED") != "1":  # torchrun
        kwargs["devices"] = int(os.environ["LOCAL_WORLD_SIZE"])
        kwargs["num_nodes"] = int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
    if cfg.num_nodes is not None:
        kwargs["num_nodes"] = cfg.num_nodes
    if cfg.precision is not None:
        kwargs["precision"] = cfg.precision
    if strategy in ("fsdp", "fsdp2"):
        # Ours, built below; from `fabric run --strategy fsdp` Fabric would replace it by the launcher's
        # name, which wraps the whole model as one unit.
        os.environ.pop("LT_STRATEGY", None)
    if strategy == "fsdp":  # one FSDP unit per block, not one for the whole model
        from lightning_fabric.strategies import FSDPStrategy

        kwargs["strategy"] = FSDPStrategy(auto_wrap_policy=set(blocks),
                                          state_dict_type="sharded" if sharded_checkpoints else "full")
    elif strategy == "fsdp2":
        kwargs["strategy"] = fsdp2_strategy(kwargs, blocks, sharded_checkpoints)
    try:
        return Fabric(**kwargs)
    except ValueError as exc:  # settings that do not go together (fsdp on a CPU, a precision a strategy lacks)
        raise ConfigError(f"fabric: {' '.join(str(exc).split())}") from None


def fsdp2_strategy(kwargs: dict, blocks: tuple[type, ...], sharded_checkpoints: bool):
    """torch's fully_shard on each block, then on the whole model, over every process (pure data
    parallel: tensor_parallel_size 1). Checkpoints: whole files gathered on rank 0, or folders of
    shards (checkpoint.sharded); either loads into any number of processes, sharded or not."""
    from lightning_fabric.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    devices = kwargs.get("devices", 1)
    world = int(os.environ.get("WORLD_SIZE", 0)) or (devices if isinstance(devices, int) and devices > 0 else
                                                     torch.cuda.device_count() or 1) * kwargs.get("num_nodes", 1)

    def shard(model: torch.nn.Module, device_mesh) -> torch.nn.Module:
        mesh = device_mesh["data_parallel"]
        for module in list(model.modules()):
            if isinstance(module, blocks):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    # Our models return views (squeeze, slices); nothing modifies them in place, which is what the warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return ModelParallelStrategy(parallelize_fn=shard, data_parallel_size=world, tensor_parallel_size=1,
                                 save_distributed_checkpoint=sharded_checkpoints)


def make_optimizer(model: torch.nn.Module, cfg: config.OptimConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (biases and norms are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def gradient_clipper(fabric: Fabric, model, optimizer, max_norm: float):
    """A function of this step's per-parameter gradient norms (or None) that clips the global gradient
    norm, with no host sync. Where gradients are whole and unscaled (one device or DDP, no fp16 scaler)
    it is torch's clip over the optimizer's parameters, exactly what Fabric does there without its 20 us
    of Python a step, and it reuses the norms the monitoring hook already took (same order, so the same
    total, bit for bit); FSDP and fp16 go through Fabric (sharded norms, unscaling)."""
    from lightning_fabric.strategies import DDPStrategy, SingleDeviceStrategy

    if isinstance(fabric.strategy, (SingleDeviceStrategy, DDPStrategy)) and \
            getattr(fabric.strategy.precision, "scaler", None) is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def clip(norms: torch.Tensor | None) -> None:
            if norms is None or len(norms) != len(params):
                torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
            else:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.linalg.vector_norm(norms))
        return clip
    return lambda norms: fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)


def choose_run_dir(fabric: Fabric, cfg: RunConfig) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None for a fresh start). Rank 0 decides
    (fetching an artifact if one is named) and broadcasts, so every rank agrees even if clocks
    differ; an error on rank 0 is raised on every rank."""
    def decide() -> tuple[str | None, str | None, str | None]:
        resume_from = None
        if cfg.resume and cfg.resume != "auto":
            try:
                resume_from, from_artifact = checkpoints.resolve_source(cfg.resume, cfg.out_dir)
            except ConfigError as exc:
                return None, None, f"resume: {exc}"
        try:
            recorded = checkpoints.read_metadata(resume_from).get("run", {}) if resume_from else {}
        except Exception as exc:  # a truncated or foreign file
            return None, None, f"resume: {resume_from}: cannot load checkpoint ({type(exc).__name__}: {exc})"
        new_name = f"{cfg.task}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        if cfg.run_name:
            run_dir = cfg.out_dir / cfg.run_name
        elif resume_from and not from_artifact and resume_from.resolve().parent.name == "checkpoints":
            run_dir = resume_from.resolve().parent.parent  # <run>/checkpoints/<checkpoint>
        elif resume_from:  # an artifact or a loose checkpoint: the run it records, under out_dir
            run_dir = cfg.out_dir / (recorded.get("name") or new_name)
        elif cfg.resume == "auto" and (latest := checkpoints.newest_run(cfg.out_dir)):
            run_dir = latest
        else:
            run_dir = cfg.out_dir / new_name
        if recorded.get("wandb_id") and not (run_dir / "wandb_id.txt").exists():  # continue its wandb run
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "wandb_id.txt").write_text(recorded["wandb_id"])
        return str(run_dir), resume_from and str(resume_from), None

    run_dir, resume_from, error = fabric.broadcast(decide() if fabric.is_global_zero else None, 0)
    if error:
        raise ConfigError(error)
    return Path(run_dir), resume_from and Path(resume_from)


def restore(run: Run, path: Path | None) -> None:
    """Load model, optimizer, counters and RNG states. With `--resume auto`, try the run's
    checkpoints newest first and skip any that fails to load, naming it."""
    candidates = [path] if path else checkpoints.resume_candidates(run.run_dir)
    for candidate in candidates:
        try:
            rest = checkpoints.load(run.fabric, candidate, {"model": run.model, "optimizer": run.optimizer})
        except Exception as exc:  # a truncated or foreign file: fall back to the previous one
            if path:
                raise SystemExit(f"error: {candidate}: cannot load checkpoint ({type(exc).__name__}: {exc})")
            run.fabric.print(f"warning: {candidate}: cannot load checkpoint ({type(exc).__name__}); trying an older one")
            continue
        for key, value in rest["progress"].items():
            setattr(run, key, value.to(run.fabric.device) if torch.is_tensor(value) else value)
        checkpoints.restore_rng(rest["rng"], run.fabric.global_rank)
        if rest.get("precision"):  # empty unless fp16 (a scaler refuses an empty state)
            run.fabric.strategy.precision.load_state_dict(rest["precision"])
        # from an artifact or a copied file, the run's other checkpoints may not be here: rank only those that are
        run.best = [(score, name) for score, name in run.best if (run.run_dir / "checkpoints" / name).exists()]
        run.fabric.print(f"resumed from {candidate} at step {run.step} (epoch {run.epoch})")
        return
    if candidates:
        raise SystemExit(f"error: {run.run_dir}: no loadable checkpoint among {', '.join(map(str, candidates))}")
    run.fabric.print(f"resume auto: no checkpoint in {run.run_dir}; starting a new run")


def stop_on_signals(run: Run) -> None:
    """SIGTERM, and SIGUSR1 (SLURM's warning before preemption), ask for a checkpoint and a clean
    exit at the next log interval, taken by every rank together; a second signal exits at once."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        if run.stop_signal:
            raise SystemExit(f"{signal.Signals(signum).name} again: exiting at once")
        run.stop_signal = signum
        print(f"{signal.Signals(signum).name} received: saving a checkpoint at the next log interval", flush=True)

    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, handler)


def preempt(run: Run, hooks: callbacks.Hooks) -> None:
    """Save last.ckpt (every rank takes part) and say how to resume."""
    callbacks.call(hooks, "on_train_end", run)
    checkpoints.save(run, run.run_dir / "checkpoints" / "last.ckpt")
    if run.loggers:
        run.loggers.finish()
    run.fabric.print(f"stopped at step {run.step} on a signal; checkpoint {run.run_dir / 'checkpoints' / 'last.ckpt'}; "
                     f"resume with: python train.py {run.cfg.task} --out-dir {run.cfg.out_dir} "
                     f"--run-name {run.run_dir.name} --resume auto")


def log_training(run: Run, hooks: callbacks.Hooks) -> None:
    """The one host sync of a log interval: the mean training loss (and the task's other training
    values) since the last log, with the values the task's schedules apply at this step."""
    means = (run.fabric.all_reduce(run.loss_sum, reduce_op="mean") / run.steps_since_log).tolist()
    run.log_row = {f"train/{name}": value for name, value in zip(run.task.train_fields, means)}
    run.log_row.update({f"schedule/{k}": v for k, v in run.task.scheduled(run.cfg, run.step).items()})
    run.loss_sum.zero_()
    run.steps_since_log = 0
    callbacks.call(hooks, "on_log", run)
    if run.loggers:
        run.loggers.log(run.log_row, run.step)


def print_table(title: str, metrics: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"  {'metric':<24}{'value':>12}")
    for name, value in metrics.items():
        print(f"  {name:<24}{value:>12.4f}" if isinstance(value, float) else f"  {name:<24}{value:>12}")


def train(cfg: RunConfig) -> dict[str, float]:
    config.check(cfg)
    task = TASKS[cfg.task]
    fabric = make_fabric(cfg.fabric, task.blocks, cfg.checkpoint.sharded)
    if os.environ.get("LT_CLI_USED") != "1":  # under `fabric run` the processes already exist
        fabric.launch()
    if fabric.device.type == "cuda":
        torch.set_float32_matmul_precision(cfg.fabric.matmul_precision)
    world = fabric.world_size
    micro_batch, remainder = divmod(cfg.data.batch_size, cfg.train.accumulate * world)
    if remainder or micro_batch == 0:
        raise ConfigError(f"data.batch_size: expected a multiple of train.accumulate x devices "
                          f"({cfg.train.accumulate} x {world}), got {cfg.data.batch_size}")
    fabric.seed_everything(cfg.train.seed)  # the same on every rank: identical initial weights

    # Data: prepared once (rank 0 of each node first), then memory-mapped by every rank.
    with fabric.rank_zero_first(local=True):
        data.ensure_prepared(cfg.data.sources, cfg.data.dir)
    splits = {split: data.PackedPositions(cfg.data.dir, split, cfg.data.clamp) for split in data.SPLITS}
    on_device = fabric.device if cfg.data.on_device else None
    train_loader = data.make_loader(splits["train"], micro_batch, True, cfg.train.seed, fabric.global_rank, world,
                                    drop_last=True, num_workers=cfg.data.num_workers, device=on_device)
    eval_loaders = {split: data.make_loader(splits[split], cfg.data.eval_batch_size, False, 0, fabric.global_rank,
                                            world, drop_last=False, device=on_device) for split in ("val", "test")}
    steps_per_epoch = len(train_loader.sampler) // cfg.train.accumulate
    if steps_per_epoch == 0:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} exceeds the {len(splits['train'])} training positions")

    # Model, then compile, then Fabric's wrappers, then the optimizer over the wrapped parameters.
    model = task.build_model(cfg)
    if cfg.train.compile:
        model = torch.compile(model)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(make_optimizer(model, cfg.optim, fused=fabric.device.type == "cuda"))
    if fabric.global_rank:  # the weights are drawn: from here each rank draws its own numbers (masks, noise);
        fabric.seed_everything(cfg.train.seed + fabric.global_rank, verbose=False)  # rank 0 keeps one process's
    skip_sync = cfg.train.skip_grad_sync if cfg.train.skip_grad_sync is not None else \
        not checkpoints.is_sharding(fabric)
    if not cfg.data.on_device:  # Fabric moves each evaluation batch to the device
        # The training batches are moved by the loop itself (Fabric's loader wrapper costs about 35 us a
        # step in Python, which shows on small models); evaluation is not on the hot path.
        eval_loaders = {k: fabric.setup_dataloaders(v, use_distributed_sampler=False) for k, v in eval_loaders.items()}
    train_sampler = train_loader.sampler

    limits = [cfg.train.max_steps or math.inf, (cfg.train.max_epochs or math.inf) * steps_per_epoch]
    total_steps = int(min(limits)) if min(limits) < math.inf else sys.maxsize  # max_time alone: no step limit
    if total_steps == sys.maxsize and cfg.schedule.kind == "cosine" and cfg.schedule.total_steps is None:
        raise ConfigError("schedule.total_steps: expected a step count for the cosine decay when only "
                          "train.max_time limits the run")
    run_dir, resume_from = choose_run_dir(fabric, cfg)
    run = Run(fabric, cfg, task, model, optimizer, run_dir, loggers=None, total_steps=total_steps,
              loss_sum=torch.zeros(len(task.train_fields), device=fabric.device))
    if cfg.init_from and not cfg.resume:  # fine-tuning: the weights only, a fresh optimizer and counters
        checkpoints.load(fabric, checkpoints.resolve_source(cfg.init_from, cfg.out_dir)[0], {"model": model},
                         strict=False)
        fabric.print(f"initialised the weights from {cfg.init_from}")
    if cfg.resume:
        restore(run, resume_from)
    stop_on_signals(run)
    if fabric.is_global_zero:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        config.save_json(dataclasses.replace(cfg, resume=None), run_dir / "config.json")
        run.loggers = open_loggers(cfg, run_dir, run.step if cfg.resume else None)
        print(f"run folder: {run_dir}  ({world} process{'es' if world > 1 else ''}, {fabric.device}, "
              f"micro-batch {micro_batch} x {cfg.train.accumulate} accumulation x {world} = {cfg.data.batch_size})")
    hooks = callbacks.merge(
        callbacks.throughput(),
        callbacks.monitoring(cfg.monitor, cfg.log.every),
        callbacks.progress_bar(total_steps if total_steps < sys.maxsize else None) if cfg.log.progress_bar else {},
        callbacks.checkpointing(),
        callbacks.prediction_table(splits["val"], cfg.log.predictions) if cfg.task == "chess" else {},
        callbacks.early_stopping(cfg.train.early_stop_patience, cfg.train.early_stop_min_delta)
        if cfg.train.early_stop_patience else {},
    )
    schedule = cfg.schedule
    lr_at = lambda step: learning_rate(step, schedule.kind, cfg.optim.lr, schedule.warmup_steps,  # noqa: E731
                                       schedule.total_steps or total_steps, schedule.min_lr_ratio,
                                       schedule.noam_scale, schedule.noam_d_model or cfg.model.width)
    train_size = len(splits["train"])
    clip = gradient_clipper(fabric, model, optimizer, cfg.train.clip)

    start_time = time.perf_counter()
    callbacks.call(hooks, "on_train_start", run)
    while not run.should_stop and run.step < total_steps:
        train_sampler.start_epoch(run.epoch, skip_batches=run.step_in_epoch * cfg.train.accumulate)
        batches = iter(train_loader)
        while run.step_in_epoch < steps_per_epoch and run.step < total_steps and not run.should_stop:
            run.lr = lr_at(run.step)
            for group in optimizer.param_groups:
                group["lr"] = run.lr
            for micro in range(cfg.train.accumulate):
                waited = time.perf_counter()
                batch = [t.to(fabric.device, non_blocking=True) for t in next(batches)]
                run.data_wait_s += time.perf_counter() - waited
                # With skip_sync, gradients are all-reduced only on the last micro-batch of the step.
                with fabric.no_backward_sync(model, enabled=skip_sync and micro < cfg.train.accumulate - 1):
                    loss, logged = task.train_step(cfg, model, batch, run.step, train_size)
                    if cfg.train.accumulate > 1:  # the mean over micro-batches (no extra op when there is one)
                        loss, logged = loss / cfg.train.accumulate, logged / cfg.train.accumulate
                    fabric.backward(loss)
                run.loss_sum += logged  # stays on the device
            callbacks.call(hooks, "after_backward", run)
            if run.skip_step:  # the non-finite guard drops this update
                run.skip_step = False
            else:
                if cfg.train.clip is not None:
                    clip(run.grad_norms)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.grad_norms = None
            run.step += 1
            run.step_in_epoch += 1
            run.steps_since_log += 1
            end_of_epoch = run.step_in_epoch == steps_per_epoch
            if end_of_epoch:
                run.epoch, run.step_in_epoch = run.epoch + 1, 0

            if run.step % cfg.log.every == 0 or run.step == total_steps:
                log_training(run, hooks)
                if fabric.all_reduce(torch.tensor(float(run.stop_signal), device=fabric.device), reduce_op="max").item():
                    preempt(run, hooks)
                    return None
                if cfg.train.max_time and fabric.broadcast(time.perf_counter() - start_time > cfg.train.max_time * 60):
                    fabric.print(f"max_time of {cfg.train.max_time} minutes reached at step {run.step}")
                    run.should_stop = True

            last_step = run.step == total_steps or run.should_stop or (
                cfg.train.max_epochs is not None and run.epoch >= cfg.train.max_epochs)
            run.validated_this_step = run.step % cfg.train.val_every == 0 or end_of_epoch or last_step
            if run.validated_this_step:
                metrics, histograms = task.evaluate(fabric, cfg, model, eval_loaders["val"])
                run.val_metrics = {f"val/{k}": v for k, v in metrics.items()}
                if run.loggers:
                    run.loggers.log(run.val_metrics, run.step)
                    if histograms:
                        run.loggers.log_histograms(histograms, run.step)
                callbacks.call(hooks, "on_validation_end", run)
            callbacks.call(hooks, "after_step", run)
            if end_of_epoch:
                break
        if cfg.train.max_epochs is not None and run.epoch >= cfg.train.max_epochs:
            break
    if run.steps_since_log:  # stopped early inside a log interval
        log_training(run, hooks)
    callbacks.call(hooks, "on_train_end", run)

    # Test once, on the best checkpoint (by the monitored validation metric).
    if run.best:
        best_path = run_dir / "checkpoints" / run.best[0][1]
        checkpoints.load(fabric, best_path, {"model": model}, strict=False)
        fabric.print(f"testing the best checkpoint: {best_path.name} ({cfg.checkpoint.monitor} {run.best[0][0]:.4f})")
    test, _ = task.evaluate(fabric, cfg, model, eval_loaders["test"])
    if fabric.is_global_zero:
        title, rows = task.report(cfg, test)
        print_table(f"test metrics ({title})", rows)
        (run_dir / "test_metrics.json").write_text(json.dumps({f"test/{k}": v for k, v in test.items()}, indent=2))
        if run.loggers:
            run.loggers.summary({f"test/{k}": v for k, v in test.items()})
            run.loggers.finish()
    fabric.barrier()
    return test


def shutdown_distributed() -> None:
    """Fabric leaves the process group up, and its threads then race interpreter exit: about 1 in 10
    two-process runs aborted ("terminate called without an active exception"). Destroy it, but only
    once the DDP wrapper that holds it is gone (destroying it first hung the teardown instead)."""
    import gc

    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def open_loggers(cfg: RunConfig, run_dir: Path, resume_step: int | None):
    import loggers

    return loggers.make_loggers(cfg.log.logger, run_dir, cfg.log.project, cfg.log.wandb_mode, config.to_dict(cfg),
                                resume_step)


def split_args(argv: list[str]) -> tuple[str, str | None, list[str], RunConfig]:
    """`train.py [TASK] [TOOL] [--config FILE] [flags]` -> task, tool (None = train), the remaining
    flags, and the defaults: the task's, or a saved config given by `--config` (flags override it)."""
    import tools

    task = argv[0] if argv and not argv[0].startswith("-") else "chess"
    args = argv[1:] if argv and argv[0] == task else argv
    if task not in TASKS:
        raise ConfigError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    tool = args[0] if args and args[0] in tools.TOOLS else None
    args = args[1:] if tool else args
    default = TASKS[task].config()
    if "--config" in args:
        at = args.index("--config")
        if at + 1 >= len(args):
            raise ConfigError("--config: expected a JSON file written by a run (config.json)")
        default = config.load_json(Path(args[at + 1]), TASKS[task].config)
        if default.task != task:
            raise ConfigError(f"--config {args[at + 1]}: a config of the {default.task!r} task, expected {task!r}")
        args = args[:at] + args[at + 2:]
    return task, tool, args, default


def parse_args(argv: list[str]) -> RunConfig:
    """The training config from the command line."""
    task, _, args, default = split_args(argv)
    return tyro.cli(TASKS[task].config, default=default, args=args, prog=f"train.py {task}")


def main(argv: list[str]) -> int:
    try:
        task, tool, args, default = split_args(argv)
        if tool:
            import tools

            tools.main(task, tool, args, default)
        else:
            train(tyro.cli(TASKS[task].config, default=default, args=args, prog=f"train.py {task}"))
            shutdown_distributed()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
