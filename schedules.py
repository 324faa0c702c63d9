"""Schedules: pure functions of the optimizer step (0-based), so resuming needs only the step.

The learning rate follows one of:
  constant   base_lr
  cosine     linear warmup from base_lr/warmup to base_lr, then cosine decay to min_lr at total_steps
  noam       scale * d_model^-0.5 * min(n^-0.5, n * warmup^-1.5) with n = step + 1 (Vaswani et al. 2017)

Every other scheduled value (the dVAE's KL weight, temperature, hardness and mask fraction) is one
generic `ramp`: hold a start value, then move to an end value with a chosen shape.
"""

import math
import sys

from config import ConfigError

LR_SCHEDULES = ("constant", "cosine", "noam")
RAMP_SHAPES = ("constant", "linear", "exponential", "cosine", "threshold")


def constant(step: int, base_lr: float) -> float:
    return base_lr


def warmup_cosine(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def noam(step: int, scale: float, d_model: int, warmup_steps: int) -> float:
    n = step + 1  # the formula is undefined at 0
    return scale * d_model**-0.5 * min(n**-0.5, n * max(1, warmup_steps) ** -1.5)


def learning_rate(
    step: int,
    kind: str,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    noam_scale: float,
    d_model: int,
) -> float:
    """The learning rate at `step` for the schedule named `kind` (one of LR_SCHEDULES)."""
    if kind == "constant":
        return constant(step, base_lr)
    if kind == "cosine":
        return warmup_cosine(step, base_lr, warmup_steps, total_steps, base_lr * min_lr_ratio)
    if kind == "noam":
        return noam(step, noam_scale, d_model, warmup_steps)
    raise ValueError(f"unknown schedule {kind!r}; expected one of {', '.join(LR_SCHEDULES)}")


def ramp(step: int, start: float, end: float, hold: int, steps: int, shape: str) -> float:
    """`start` for the first `hold` steps, then towards `end` over `steps` steps, `end` after that.
    With s = step - hold in [0, steps) and a = start, b = end:
      constant     a throughout (the value never moves)
      linear       a + (b - a) * s / steps
      exponential  a * (b / a) ** (s / steps)  (geometric: a and b non-zero, same sign)
      cosine       a + (b - a) * (1 - cos(pi * s / steps)) / 2
      threshold    a, then b from step hold + steps on"""
    if shape == "constant":
        return start
    if shape not in RAMP_SHAPES:
        raise ValueError(f"unknown ramp shape {shape!r}; expected one of {', '.join(RAMP_SHAPES)}")
    if step < hold:
        return start
    s = step - hold
    if s >= steps:
        return end
    progress = s / steps
    if shape == "linear":
        return start + (end - start) * progress
    if shape == "exponential":
        return start * (end / start) ** progress
    if shape == "cosine":
        return start + (end - start) * (1 - math.cos(math.pi * progress)) / 2
    return start  # threshold: not yet


def lr_function(s, base_lr: float, total_steps: int):
    """step -> learning rate for a ScheduleConfig `s` (its total_steps, else the run's)."""
    return lambda step: learning_rate(
        step,
        s.kind,
        base_lr,
        s.warmup_steps,
        s.total_steps or total_steps,
        s.min_lr_ratio,
        s.noam_scale,
        s.noam_d_model,
    )


def step_limit(cfg, steps_per_epoch: int) -> int:
    """The optimizer steps the run takes: max_steps or max_epochs, the first reached (sys.maxsize: max_time only)."""
    limits = [cfg.train.max_steps or math.inf, (cfg.train.max_epochs or math.inf) * steps_per_epoch]
    total_steps = int(min(limits)) if min(limits) < math.inf else sys.maxsize
    if total_steps == sys.maxsize and cfg.schedule.kind == "cosine" and cfg.schedule.total_steps is None:
        raise ConfigError(
            "schedule.total_steps: expected a step count for the cosine decay when only train.max_time limits the run"
        )
    return total_steps
