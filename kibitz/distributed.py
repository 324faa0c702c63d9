"""Processes and devices: the Fabric object for a FabricConfig (with kibitz's per-block FSDP and
FSDP2), the gradient clip that suits the strategy, stopping every rank together (on an error or a signal),
the processes of a run started from a notebook (`launched`), a clean teardown of the process group, and every
rank's RNG states and stream position gathered for a checkpoint and given back to each rank on resume."""

import contextlib
import functools
import logging
import multiprocessing
import os
import random
import signal
import sys
import threading
import warnings

import numpy as np
import torch
import torch.distributed
from lightning_fabric import Fabric

from config import ConfigError, FabricConfig, strategy_of


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: an FSDP2 DTensor's shard (FSDP's flat slices are plain tensors already)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def make_fabric(cfg: FabricConfig, blocks: tuple[type, ...] = (), sharded_checkpoints: bool = False) -> Fabric:
    """Pass Fabric only what the user set: under `fabric run` a value that differs from the
    launcher's is an error, and under torchrun the device count comes from its environment."""
    strategy = strategy_of(cfg)
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

        kwargs["strategy"] = FSDPStrategy(
            auto_wrap_policy=set(blocks), state_dict_type="sharded" if sharded_checkpoints else "full"
        )
    elif strategy == "fsdp2":
        kwargs["strategy"] = fsdp2_strategy(kwargs, blocks, sharded_checkpoints)
    try:
        return Fabric(**kwargs)
    except ValueError as exc:  # settings that do not go together (fsdp on a CPU, a precision a strategy lacks)
        raise ConfigError(f"fabric: {' '.join(str(exc).split())}") from None
    except RuntimeError as exc:
        if "interactive environment" not in str(exc):
            raise
        raise ConfigError(
            f"fabric.strategy: {strategy} starts its processes by running the script again, and a notebook has no "
            "script; use ddp_notebook, which forks this process once per device"
        ) from None


def in_notebook() -> bool:
    """In a Jupyter kernel's own process (not one it forked): a notebook, where a widget can render."""
    ipython = sys.modules.get("IPython")  # imported by a kernel; a process that merely loaded it has no shell
    shell = ipython.get_ipython() if ipython else None
    return getattr(shell, "kernel", None) is not None and multiprocessing.parent_process() is None


def launched(cfg, blocks: tuple[type, ...], function):
    """`function(fabric)` on every process of a run with config `cfg`, rank 0's result returned; the caller's state
    kept. Under a launcher (`fabric run`, torchrun, SLURM) the processes exist already. Otherwise Fabric starts them:
    by running the script again (ddp), or by forking this process (ddp_notebook: a notebook has no script to run),
    this process waiting for rank 0's result. A forked process that failed has said why; here it is one line more."""
    with caller_state_kept():
        fabric = make_fabric(cfg.fabric, blocks, cfg.checkpoint.sharded)
        if os.environ.get("LT_CLI_USED") == "1":  # `fabric run`: Fabric refuses a second launch
            return function(fabric)
        return launch(fabric, function)


EARLY_SIGNALS: list[int] = []  # a forked rank's SIGINTs from before its own handlers: `stop_on_signals` takes them


def keep_early_interrupts() -> None:
    """SIGINT makes this process stop waiting for the ranks it forks (as Python's own handler does), while a rank
    forked from it keeps the signal for its own handlers, so that every rank stops at the same step. The caller's
    handler comes back with `caller_state_kept`."""
    launcher = os.getpid()

    def interrupted(signum, frame):
        if os.getpid() == launcher:
            raise KeyboardInterrupt
        EARLY_SIGNALS.append(signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, interrupted)


def launch(fabric: Fabric, function):
    reasons = multiprocessing.get_context("fork").SimpleQueue()  # a forked process's one-line error, for the caller
    keep_early_interrupts()
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # not "Terminating process N": the
    try:  # failed rank's line says what happened
        return fabric.launch(functools.partial(reporting, function, reasons))
    except KeyboardInterrupt:  # a notebook's interrupt reaches its kernel only: pass it on to the forked ranks
        forked = multiprocessing.active_children()
        if not forked:
            raise
        for process in forked:  # each saves at its next log interval, says how to resume, and exits
            os.kill(process.pid, signal.SIGINT)
        for process in forked:
            process.join()
        return None
    except (torch.multiprocessing.ProcessExitedException, torch.multiprocessing.ProcessRaisedException) as exc:
        if not reasons.empty():  # ours, said by the process that met it (the others fail after it, on its absence)
            kind, reason = reasons.get()
            raise (ConfigError(reason) if kind == "config" else SystemExit(reason)) from None
        if isinstance(exc, torch.multiprocessing.ProcessExitedException):
            raise SystemExit(
                f"error: process {exc.error_index} of the run stopped (exit code {exc.exit_code})"
            ) from None
        raise
    except RuntimeError as exc:
        if "CUDA is already initialized" in str(exc):
            raise ConfigError(
                "fabric.strategy: ddp_notebook forks this process, and it has used CUDA already (a forked process "
                "cannot use its parent's CUDA context): restart the kernel and start the run before anything else "
                "touches the GPU"
            ) from None
        raise


def reporting(function, reasons, fabric: Fabric):
    """`function(fabric)`, its one-line errors also put in `reasons` (rank 0's result goes back by Fabric's queue)."""
    try:
        return function(fabric)
    except ConfigError as exc:
        reasons.put(("config", str(exc)))
        raise
    except SystemExit as exc:
        if isinstance(exc.code, str):
            reasons.put(("exit", exc.code))
            if multiprocessing.parent_process() is not None:  # forked: the caller says it (a str code would be
                raise SystemExit(2) from None  # printed here too, by multiprocessing)
        raise


def fsdp2_strategy(kwargs: dict, blocks: tuple[type, ...], sharded_checkpoints: bool):
    """torch's fully_shard on each block, then on the whole model, over every process (pure data
    parallel: tensor_parallel_size 1). Checkpoints: whole files gathered on rank 0, or folders of
    shards (checkpoint.sharded); either loads into any number of processes, sharded or not."""
    from lightning_fabric.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    devices = kwargs.get("devices", 1)
    world = int(os.environ.get("WORLD_SIZE", 0)) or (
        devices if isinstance(devices, int) and devices > 0 else torch.cuda.device_count() or 1
    ) * kwargs.get("num_nodes", 1)

    def shard(model: torch.nn.Module, device_mesh) -> torch.nn.Module:
        mesh = device_mesh["data_parallel"]
        for module in list(model.modules()):
            if isinstance(module, blocks):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    # Our models return views (squeeze, slices); nothing modifies them in place, which is what the warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return ModelParallelStrategy(
        parallelize_fn=shard,
        data_parallel_size=world,
        tensor_parallel_size=1,
        save_distributed_checkpoint=sharded_checkpoints,
    )


def gradient_clipper(fabric: Fabric, model, optimizer, max_norm: float):
    """A function of this step's per-parameter gradient norms (or None) that clips the global gradient
    norm, with no host sync. Where gradients are whole and unscaled (one device or DDP, no fp16 scaler)
    it is torch's clip over the optimizer's parameters, exactly what Fabric does there without its 20 us
    of Python a step, and it reuses the norms the loop already took for the non-finite guard (same order, so
    the same total, bit for bit); FSDP and fp16 go through Fabric (sharded norms, unscaling)."""
    from lightning_fabric.strategies import DDPStrategy, SingleDeviceStrategy

    if (
        isinstance(fabric.strategy, (SingleDeviceStrategy, DDPStrategy))
        and getattr(fabric.strategy.precision, "scaler", None) is None
    ):
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def clip(norms: torch.Tensor | None) -> None:
            if norms is None or len(norms) != len(params):
                torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
            else:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.linalg.vector_norm(norms))

        return clip
    return lambda norms: fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The task's own module inside Fabric's wrapper."""
    from lightning_fabric.wrappers import is_wrapped

    return model.module if is_wrapped(model) else model


def reshard(model: torch.nn.Module) -> None:
    """After a forward without backward (an evaluation), FSDP2 leaves the root module's parameters gathered (its
    heuristic: the backward would need them at once): shard them again, or every rank holds the whole root and a
    checkpoint save finds no sharded model (a task without `blocks` is all root). A no-op without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def stop_together(fabric: Fabric, error: str | None) -> None:
    """Every rank calls this at the same point after work that may fail on some ranks only (rank 0 writing a
    file): if any failed, every rank stops, the failing ones with their one-line `error`, the others quietly
    (exit 2). Without it the others would wait in their next collective for a rank that is gone or elsewhere."""
    failed = error is not None
    if fabric.world_size > 1:
        flag = torch.tensor(float(failed), device=fabric.device)
        failed = bool(fabric.all_reduce(flag, reduce_op="max").item())
    if error is not None:
        raise SystemExit(error)
    if failed:
        raise SystemExit(2)


def shutdown_distributed() -> None:
    """Fabric leaves the process group up, and its threads then race interpreter exit: about 1 in 10
    two-process runs aborted ("terminate called without an active exception"). Destroy it, but only
    once the DDP wrapper that holds it is gone (destroying it first hung the teardown instead)."""
    import gc

    if torch.distributed.is_available() and torch.distributed.is_initialized():  # a full collection costs 0.2 s
        gc.collect()
        torch.distributed.destroy_process_group()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # Ctrl-C, a scheduler's stop, SLURM's warning


class ValidationStopped(Exception):
    """A signal during a validation of a one-process run: the validation stops, the last step is saved."""


def stop_on_signals(run) -> None:
    """Ctrl-C (SIGINT), SIGTERM and SIGUSR1 (SLURM's warning before preemption) ask for a checkpoint and a clean
    exit at the next log interval, taken by every rank together; during a validation of a one-process run, at once
    (several ranks finish it: they would stop at different points of its collective); during the final test, the
    test goes on. A second signal exits at once. DataLoader workers, which inherit the handler, leave the saying
    to their parent."""
    if threading.current_thread() is not threading.main_thread():
        return
    owner = os.getpid()

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if os.getpid() != owner:
            return
        if run.stop_signal:
            print(f"{name} again: exiting at once", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)  # the shell's code for a process ended by that signal
        run.stop_signal = signum
        if run.fabric.global_rank:  # every rank stops; rank 0 says so
            return
        if run.phase == "test":
            print(f"{name} received: the training is done and saved; the test goes on (again: exit)", flush=True)
        elif run.phase == "validate" and run.fabric.world_size == 1:
            print(f"{name} received: stopping the validation, saving the last step's checkpoint", flush=True)
            raise ValidationStopped
        else:
            print(f"{name} received: saving a checkpoint at the next log interval", flush=True)

    forked = multiprocessing.parent_process() is not None  # a ddp_notebook rank: SIGTERM is torch ending it after
    for signum in STOP_SIGNALS:  # another rank failed, which has said why; it ends as SIGTERM ends a process
        if not (forked and signum == signal.SIGTERM):
            signal.signal(signum, handler)
    while EARLY_SIGNALS:
        handler(EARLY_SIGNALS.pop(0), None)


RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")  # what Fabric sets in os.environ


@contextlib.contextmanager
def caller_state_kept():
    """A run called from a notebook or another program leaves it as it found it: its SIGINT/SIGTERM/SIGUSR1 handlers,
    its warning filters (a run silences a few warnings it knows to be noise) and the environment variables Fabric
    sets (a later process started from the caller would otherwise meet this run's rendezvous port)."""
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    environment = {name: os.environ.get(name) for name in RENDEZVOUS}
    with warnings.catch_warnings():
        try:
            yield
        finally:
            if threading.current_thread() is threading.main_thread():
                for signum, handler in handlers.items():
                    signal.signal(signum, handler)
            for name, value in environment.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


# ---------------------------------------------------------------- every rank's RNG states and stream position


def rng_states(fabric) -> list[dict]:
    """Every rank's RNG states (python, numpy, torch, cuda) as tensors, numbers and lists (what the safe loader
    reads), gathered so rank 0 can save them all."""
    version, words, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if fabric.world_size == 1:
        return [state]
    gathered = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def loader_states(fabric, loader) -> list | None:
    """Every rank's position in its stream (torchdata's state_dict: plain data), gathered so rank 0 can save them all;
    None for epoch-ordered data, whose position the step counters give."""
    if not hasattr(loader, "state_dict"):
        return None
    if fabric.world_size == 1:
        return [loader.state_dict()]
    gathered = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, loader.state_dict())
    return gathered


def restore_rng(states: list[dict], rank: int) -> None:
    state = states[rank % len(states)]  # a changed world size reuses states; resume then is not bitwise
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
