"""The non-finite guard (`--monitor.on-nonfinite warn|skip|stop`): an inf or NaN in a gradient, the loss or,
under skip, the weights. The loop keeps each step's per-layer gradient norms on the device (the clip reuses
them); the next log reads them with the loss in its one host sync, and `warn_or_stop` acts on what it read. Only
skip reads flags every step (`skip_this_step`)."""

import math

import torch

from kibitz import checkpoints


def on_any_rank(fabric, bad: torch.Tensor) -> torch.Tensor:
    """Flags combined over the ranks: under FSDP or FSDP2 a rank holds only a part of each parameter, so one rank
    may see a NaN the others do not; every rank must see it, or one would stop (and save) alone and hang."""
    if fabric.world_size == 1:
        return bad
    return fabric.all_reduce(bad.float(), reduce_op="max") > 0


def skip_this_step(run) -> bool:
    """Under skip: read this step's flags (gradient norms, the loss, the weights after the last update: finite
    gradients times a huge learning rate can still overflow them), agreed by every rank. True = drop this step."""
    window, names = run.window, run.param_names
    bad_loss = (~torch.isfinite(window.sums)).any()[None]
    flags = torch.cat([~torch.isfinite(run.grad_norms), bad_loss, checkpoints.nonfinite_weights(run)])
    flags = on_any_rank(run.fabric, flags).float().tolist()  # every rank skips together (each has its own loss)
    bad_grads, bad_loss, bad_weights = flags[: len(names)], flags[len(names)], flags[len(names) + 1 :]
    step = run.progress.step
    if any(bad_weights):
        raise SystemExit(
            f"error: step {step}: the update made {names[bad_weights.index(1.0)]} not finite (is the learning rate "
            "too large?); stopped without saving it: the last checkpoint holds the last finite weights"
        )
    if bad_loss:
        window.sums.copy_(window.sums_before_step)  # leave this step out of the logged mean
        window.steps -= 1
        run.fabric.print(f"warning: step {step + 1}: the training loss is not finite; skipping this step")
        return True
    if any(bad_grads):
        name = names[bad_grads.index(1.0)]
        run.fabric.print(f"warning: step {step + 1}: the gradient of {name} is not finite; skipping this step")
        return True
    window.sums_before_step = window.sums.clone()
    return False


def warn_or_stop(run, means: list[float], bad_gradient: bool, first_bad: int, used: int, interval: int) -> None:
    """At a log, given what its one host sync read: the mean training values of the interval, whether a gradient
    norm went non-finite in its `used` rows and the first such (row x layer) index. warn: say so; stop: save
    and exit non-zero."""
    names, step = run.param_names, run.progress.step
    finite_loss = all(math.isfinite(value) for value in means)
    if run.cfg.monitor.on_nonfinite == "skip" and not finite_loss:
        run.fabric.print(f"warning: step {step}: every step since the last log was skipped")
    elif bad_gradient or not finite_loss:
        if bad_gradient:
            first_step = step - used + 1 + first_bad // len(names)
            message = f"step {first_step}: the gradient of {names[first_bad % len(names)]} is not finite"
        else:  # e.g. NaN outputs under a ReLU: the gradients are 0, the loss tells
            message = f"steps {step - interval + 1}-{step}: the training loss is not finite"
        if run.cfg.monitor.on_nonfinite == "stop":
            path = run.run_dir / "checkpoints" / f"nonfinite-step-{step:08d}.ckpt"
            checkpoints.save(run, path)
            raise SystemExit(f"error: {message}; stopped (--monitor.on-nonfinite stop), state saved in {path}")
        run.fabric.print(f"warning: {message}")
