"""The trainer's evaluation pass, for a task that gives `eval_step`: eval mode, no_grad, the split's loader from its
start, the per-batch sums added up on the device, one all-reduce over ranks, then the metrics. A task that gives a
whole `evaluate` instead (for what sums cannot express) is called as it is."""

import torch

from config import ConfigError, FormChanged
from kibitz import distributed


def evaluate(fabric, cfg, task, model, loader) -> tuple[dict, dict]:
    """-> (metrics {name: number}, histograms {name: tensor}) over the whole split, every rank's examples counted; the
    model left in the mode it was in, and sharded again under FSDP2, however the pass ends."""
    training = model.training
    try:
        if task.eval_step is None:
            return task.evaluate(fabric, cfg, model, loader)
        return summed(fabric, cfg, task, model, loader)
    finally:
        model.train(training)
        distributed.reshard(model)


def summed(fabric, cfg, task, model, loader) -> tuple[dict, dict]:
    """The pass for a task's `eval_step`: each batch's sums added up on the device, one all-reduce over ranks."""
    model.eval()
    if hasattr(getattr(loader, "sampler", None), "start_epoch"):  # an epoch-ordered loader: from its first batch
        loader.sampler.start_epoch(0)
    names, shapes, total = None, None, None
    with torch.no_grad():
        for batch in loader:
            sums = task.eval_step(cfg, model, batch)
            if total is None:
                names, shapes = check_sums(task, sums), [torch.as_tensor(v).shape for v in sums.values()]
            elif list(sums) != names or [torch.as_tensor(v).shape for v in sums.values()] != shapes:
                got = {name: tuple(torch.as_tensor(v).shape) for name, v in sums.items()}
                first = {name: tuple(shape) for name, shape in zip(names, shapes)}
                raise FormChanged("eval_step", f"returned sums of the shapes {first} at its first batch, then {got}")
            flat = torch.cat([torch.as_tensor(v, device=fabric.device).reshape(-1).double() for v in sums.values()])
            total = flat if total is None else total + flat
    if total is None:
        raise ConfigError("data: the evaluated split gave no batch (an empty dataset or stream)")
    total = fabric.all_reduce(total, reduce_op="sum").cpu() if fabric.world_size > 1 else total.cpu()
    sums = dict(zip(names, torch.split(total, [s.numel() for s in shapes])))
    sums = {name: value.reshape(shape) for (name, value), shape in zip(sums.items(), shapes)}
    if task.eval_metrics is None and not float(sums["count"]) > 0:  # the trainer divides by it: say whose it is
        raise ConfigError(
            f"task {task.name}: eval_step: its counts add up to {float(sums['count'])} over the split; "
            "expected the number of examples in each batch"
        )
    result = task.eval_metrics(cfg, sums) if task.eval_metrics else means(sums)
    return result if isinstance(result, tuple) else (result, {})


def check_sums(task, sums) -> list[str]:
    """eval_step's first return: {name: tensor or number}, with a `count` unless eval_metrics makes the metrics."""
    if not isinstance(sums, dict) or not all(torch.is_tensor(v) or isinstance(v, (int, float)) for v in sums.values()):
        got = type(sums).__name__ if not isinstance(sums, dict) else {k: type(v).__name__ for k, v in sums.items()}
        raise ConfigError(f"task {task.name}: eval_step: expected {{name: a tensor of this batch's sums}}, got {got}")
    if task.eval_metrics is None and "count" not in sums:
        raise ConfigError(
            f"task {task.name}: eval_step: returned no 'count' (the examples in the batch), which each metric's sum is "
            "divided by; return it, or give Task.eval_metrics"
        )
    return list(sums)


def report(task, cfg, metrics: dict) -> tuple[str, dict]:
    """The test table: the task's own report, or its name and every metric."""
    if task.report:
        return task.report(cfg, metrics)
    return task.name, {name: value for name, value in metrics.items() if name != "count"}  # a count is no metric


def means(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The default metrics: every scalar sum divided by the `count` sum (the examples seen), and the count itself."""
    count = float(sums["count"])
    return {
        name: float(value) / count if name != "count" else count for name, value in sums.items() if value.numel() == 1
    }
