"""The non-finite guard (`--monitor.on-nonfinite warn|skip|stop`): an inf or NaN in a gradient, the loss or,
under skip, the weights. Each step keeps its per-layer gradient norms on the device (the clip reuses them);
the next log reads them with the loss in its one host sync and judges. Only skip reads flags every step."""

import math

import torch

import checkpoints


def gradient_norms(run) -> bool:
    """Each layer's gradient norm, kept on the device: the clip reuses them and the next log reads all
    the rows since the last one for a non-finite gradient (two ops a step, no sync). Under
    `--monitor.on-nonfinite skip` a flag is read every step instead; True = drop this step."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.params]
    if run.sharded:
        grads = [g.to_local() for g in grads]
    if run.cfg.monitor.on_nonfinite == "skip":
        run.grad_norms = norms = torch.stack(torch._foreach_norm(grads))
        # also this step's loss (the sum since the last log was finite before it) and the weights after the
        # last update: finite gradients times a huge learning rate can still overflow them
        flags = torch.cat(
            [~torch.isfinite(norms), (~torch.isfinite(run.loss_sum)).any()[None], checkpoints.nonfinite_weights(run)]
        ).float()
        if run.fabric.world_size > 1:  # every rank must skip together (each has its own loss)
            flags = run.fabric.all_reduce(flags, reduce_op="max")
        flags = flags.tolist()  # the one mode that reads flags every step: skipping needs the host
        count = len(run.param_names)
        bad_grads, bad_loss, bad_weights = flags[:count], flags[count], flags[count + 1 :]
        if any(bad_weights):
            name = run.param_names[bad_weights.index(1.0)]
            raise SystemExit(
                f"error: step {run.step}: the update made {name} not finite (is the learning rate too large?); "
                "stopped without saving it: the last checkpoint holds the last finite weights"
            )
        if bad_loss:
            run.loss_sum.copy_(run.loss_before)  # leave this step out of the logged mean
            run.steps_since_log -= 1
            run.fabric.print(f"warning: step {run.step + 1}: the training loss is not finite; skipping this step")
            return True
        if any(bad_grads):
            run.fabric.print(
                f"warning: step {run.step + 1}: the gradient of "
                f"{run.param_names[bad_grads.index(1.0)]} is not finite; skipping this step"
            )
            return True
        run.loss_before = run.loss_sum.clone()
        return False
    if run.rows_used == len(run.norm_rows):  # a longer interval than log.every (a resumed run): grow
        run.norm_rows = torch.cat([run.norm_rows, torch.empty_like(run.norm_rows)])
    run.grad_norms = torch.stack(torch._foreach_norm(grads), out=run.norm_rows[run.rows_used])
    run.rows_used += 1
    return False


def judge(run, means: list[float], bad_gradient: bool, first_bad: int, used: int, interval: int) -> None:
    """At a log, given what its one host sync read: the mean training values of the interval, whether a gradient
    norm went non-finite in its `used` rows and the first such (row x layer) index. warn: say so; stop: save
    and exit non-zero."""
    names = run.param_names
    finite_loss = all(math.isfinite(value) for value in means)
    if run.cfg.monitor.on_nonfinite == "skip" and not finite_loss:
        run.fabric.print(f"warning: step {run.step}: every step since the last log was skipped")
    elif bad_gradient or not finite_loss:
        if bad_gradient:
            first_step = run.step - used + 1 + first_bad // len(names)
            message = f"step {first_step}: the gradient of {names[first_bad % len(names)]} is not finite"
        else:  # e.g. NaN outputs under a ReLU: the gradients are 0, the loss tells
            message = f"steps {run.step - interval + 1}-{run.step}: the training loss is not finite"
        if run.cfg.monitor.on_nonfinite == "stop":
            path = run.run_dir / "checkpoints" / f"nonfinite-step-{run.step:08d}.ckpt"
            checkpoints.save(run, path)
            raise SystemExit(f"error: {message}; stopped (--monitor.on-nonfinite stop), state saved in {path}")
        run.fabric.print(f"warning: {message}")
