"""Hooks: plain functions `hook(run)` that the loop in train.py calls at named points.

Points: `after_step` (after every optimizer step), `on_log` (every log.every steps, after the loop
has put the training metrics in `run.log_row`; hooks may add to it), `on_validation_end` (metrics
in `run.val_metrics`), `on_train_end`. A factory below returns {point: [functions]} for one concern;
`merge` joins them. Nothing here syncs with the device except where it says so.

Writing, finding and loading checkpoints is checkpoints.py; when to write them is here.
"""

import math
import time

import numpy as np
import torch
from tqdm import tqdm

import checkpoints

Hooks = dict[str, list]


def merge(*groups: Hooks) -> Hooks:
    merged: Hooks = {}
    for group in groups:
        for point, functions in group.items():
            merged.setdefault(point, []).extend(functions)
    return merged


def call(hooks: Hooks, point: str, run) -> None:
    for hook in hooks.get(point, []):
        hook(run)


# ---------------------------------------------------------------- progress, throughput, LR


def throughput() -> Hooks:
    """samples/s, steps/s, the share of time spent waiting for data, and the learning rate, measured
    between log intervals (wall clock)."""
    last = {"time": None, "step": 0}

    def start(run) -> None:
        last["time"], last["step"] = time.perf_counter(), run.step

    def measure(run) -> None:
        now = time.perf_counter()
        steps = run.step - last["step"]
        if last["time"] is not None and steps > 0:
            seconds = now - last["time"]
            run.log_row["perf/steps_per_s"] = steps / seconds
            run.log_row["perf/samples_per_s"] = steps * run.cfg.data.batch_size / seconds
            tokens = getattr(getattr(run.model, "_original_module", run.model), "tokens_per_sample", None)
            if tokens:  # a sequence model: tokens/s as well
                run.log_row["perf/tokens_per_s"] = run.log_row["perf/samples_per_s"] * tokens
            run.log_row["perf/data_wait_pct"] = 100 * run.data_wait_s / seconds
        run.data_wait_s = 0.0
        run.log_row["train/lr"] = run.lr
        run.log_row["train/epoch"] = run.epoch
        last["time"], last["step"] = now, run.step

    return {"on_train_start": [start], "on_log": [measure]}


def progress_bar(total_steps: int | None) -> Hooks:
    """tqdm on rank 0: advances every step (no sync), shows the last logged values."""
    bar = {}

    def start(run) -> None:
        if run.fabric.is_global_zero:
            bar["tqdm"] = tqdm(total=total_steps, initial=run.step, desc=run.cfg.task, unit="step",
                               dynamic_ncols=True, smoothing=0.1)

    def advance(run) -> None:
        if "tqdm" in bar:
            bar["tqdm"].update(1)

    def show(run) -> None:
        if "tqdm" in bar:
            row = run.log_row
            bar["tqdm"].set_postfix(loss=f"{row.get('train/loss', math.nan):.3f}", lr=f"{run.lr:.2e}",
                                    samples_s=f"{row.get('perf/samples_per_s', 0):.0f}", refresh=False)

    def close(run) -> None:
        if "tqdm" in bar:
            bar.pop("tqdm").close()

    return {"on_train_start": [start], "after_step": [advance], "on_log": [show], "on_train_end": [close]}


# ---------------------------------------------------------------- weights, gradients, non-finite guard

# Dense peaks in TFLOP/s (bf16, and TF32 for fp32 matmuls), by a piece of the CUDA device name; kept
# here because Fabric 2.6.6's table has the sparse H100 NVL figure and no "NVIDIA H200".
PEAK_TFLOPS = {"H200": (989, 494), "H100 NVL": (835, 417), "H100 PCIe": (756, 378), "H100": (989, 494),
               "A100": (312, 156)}


def peak_tflops(run) -> tuple[float, str] | None:
    if run.cfg.monitor.peak_tflops:
        return run.cfg.monitor.peak_tflops, "--monitor.peak-tflops"
    if run.fabric.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(run.fabric.device)
    half = "bf16" in str(run.cfg.fabric.precision) or "16" in str(run.cfg.fabric.precision)
    for key, (bf16, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return (bf16 if half else tf32), f"{name}, {'bf16' if half else 'tf32'} dense"
    return None


def monitoring(cfg, log_every: int) -> Hooks:
    """Weight/gradient statistics and histograms, gradient norms, update ratios, the non-finite
    guard, MFU and memory. Everything stays on the device until a logging step's single read."""
    import monitor
    from torch import nn

    state: dict = {}

    def logging_step(run, step: int) -> bool:
        return step % log_every == 0 or step == run.total_steps

    def start(run) -> None:
        model = getattr(run.model, "_original_module", run.model)
        # In the optimizer's order: the per-layer norms of the guard then double as the clip's (train.py).
        name_of = {id(p): n for n, p in model.named_parameters()}
        named = [(name_of[id(p)], p) for group in run.optimizer.param_groups for p in group["params"]
                 if p.requires_grad and id(p) in name_of]
        state["names"], state["params"] = [n for n, _ in named], [p for _, p in named]
        # Under FSDP2 parameters are DTensors: statistics use each rank's shard, combined at log time.
        state["sharded"] = any(hasattr(p, "to_local") for p in state["params"])
        if hasattr(model, "flops_per_sample"):  # a model that applies its layers per token counts itself
            state["flops_per_sample"] = model.flops_per_sample()
        else:
            state["flops_per_sample"] = 6 * sum(m.in_features * m.out_features for m in model.modules()
                                                if isinstance(m, nn.Linear))  # forward 2, backward 4 per MAC
        state["peak"] = peak_tflops(run)
        if state["peak"] and run.fabric.is_global_zero:
            print(f"MFU against a peak of {state['peak'][0]} TFLOP/s ({state['peak'][1]})")
        # Per-layer gradient norms of every step since the last log, kept on the device.
        state["norm_rows"] = torch.empty(log_every, len(named), device=run.fabric.device)
        state["rows_used"] = 0
        if cfg.histogram_every and run.fabric.is_global_zero and run.loggers is not None:
            run.loggers.sender = monitor.Sender(run.loggers)

    def after_backward(run) -> None:
        step = run.step + 1  # the step these gradients belong to
        params, names = state["params"], state["names"]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if state["sharded"]:
            grads, params = [g.to_local() for g in grads], [p.to_local() for p in params]
        if cfg.on_nonfinite == "skip":
            norms = torch.stack(torch._foreach_norm(grads))
            bad = ~torch.isfinite(norms)
            flag = bad.any()
            if state["sharded"]:  # every rank must skip together
                flag = run.fabric.all_reduce(flag.float(), reduce_op="max") > 0
            if flag.item():  # the one mode that reads a flag every step: skipping needs the host
                run.fabric.print(f"warning: step {step}: the gradient of {names[int(bad.int().argmax())]} is not "
                                 "finite; skipping this step")
                run.skip_step = True
        else:  # two ops a step: each layer's norm into its row; the next log finds where it first went bad
            rows = state["norm_rows"]
            if state["rows_used"] == len(rows):  # a longer interval than log.every (a resumed run): grow
                state["norm_rows"] = rows = torch.cat([rows, torch.empty_like(rows)])
            norms = torch.stack(torch._foreach_norm(grads), out=rows[state["rows_used"]])
            state["rows_used"] += 1
        if not state["sharded"]:
            run.grad_norms = norms  # the clip reuses them instead of computing them again
        if cfg.norms and logging_step(run, step):
            state["grad_norms"] = norms
            state["before"] = [p.detach().clone() for p in params]
        if cfg.histogram_every and step % cfg.histogram_every == 0:
            scaler = getattr(run.fabric.strategy.precision, "scaler", None)
            scale = scaler._get_scale_async() if scaler is not None else None  # a tensor: no sync
            for prefix, tensors, by in (("gradients", grads, scale), ("parameters", params, None)):
                if state["sharded"]:  # every rank bins its shard (max_elements does not apply)
                    stats = monitor.sharded_stats(run.fabric, tensors, cfg.bins, by)
                else:
                    stats = monitor.gather_shares(run.fabric, names, tensors, cfg.bins, cfg.max_elements, by)
                if stats is not None and run.loggers is not None:
                    run.loggers.sender.send(step, prefix, names, stats)

    def on_log(run) -> None:
        row, names = run.log_row, state["names"]
        used, count = state["rows_used"], len(names)
        bad = ~torch.isfinite(state["norm_rows"][:used]) if cfg.on_nonfinite != "skip" else torch.zeros(1, 1, dtype=torch.bool, device=run.fabric.device)
        state["rows_used"] = 0
        if state["sharded"]:  # a layer is bad if any rank's shard is
            bad = run.fabric.all_reduce(bad.float(), reduce_op="max") > 0
        pieces = [torch.stack([bad.any().float(), bad.flatten().int().argmax().float()])]
        if "grad_norms" in state:
            before = state.pop("before")
            params = [p.to_local() if state["sharded"] else p for p in state["params"]]
            deltas = torch._foreach_sub([p.detach() for p in params], before)
            delta_norms, weight_norms = torch.stack(torch._foreach_norm(deltas)), torch.stack(torch._foreach_norm(before))
            norms = state.pop("grad_norms")
            if state["sharded"]:  # the norm of a whole tensor from its shards' norms: one all-reduce
                combined = run.fabric.all_reduce(torch.stack([norms, delta_norms, weight_norms]).square(), reduce_op="sum")
                norms, delta_norms, weight_norms = combined.sqrt()
            ratios = delta_norms / weight_norms.clamp_min(1e-12)
            pieces += [norms.norm().reshape(1), norms, ratios]
        values = torch.cat([p.float() for p in pieces]).tolist()  # one transfer for all of it
        (nonfinite, first_bad), values = values[:2], values[2:]
        if values:
            row["grad_norm/total"] = values[0]
            count = len(names)
            row.update({f"grad_norm/{n}": v for n, v in zip(names, values[1:1 + count])})
            row.update({f"update_ratio/{n}": v for n, v in zip(names, values[1 + count:])})
        if "perf/samples_per_s" in row:
            if state["peak"]:
                row["perf/mfu"] = row["perf/samples_per_s"] * state["flops_per_sample"] / (state["peak"][0] * 1e12)
            if run.fabric.device.type == "cuda":
                row["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(run.fabric.device) / 2**30
        if nonfinite:
            first_step = run.step - used + 1 + int(first_bad) // count
            message = f"step {first_step}: the gradient of {names[int(first_bad) % count]} is not finite"
            if cfg.on_nonfinite == "stop":
                path = run.run_dir / "checkpoints" / f"nonfinite-step-{run.step:08d}.ckpt"
                checkpoints.save(run, path)
                raise SystemExit(f"error: {message}; stopped (--monitor.on-nonfinite stop), state saved in {path}")
            run.fabric.print(f"warning: {message}")

    def end(run) -> None:
        if run.loggers is not None and run.loggers.sender is not None:
            run.loggers.sender.flush()

    return {"on_train_start": [start], "after_backward": [after_backward], "on_log": [on_log],
            "on_train_end": [end]}


# ---------------------------------------------------------------- sample predictions


def prediction_table(dataset, count: int = 16) -> Hooks:
    """At every validation, rank 0 logs the same `count` validation positions: FEN, target,
    prediction (pawns) and the board drawn by python-chess."""
    import chess
    import chess.svg

    from encoding import row_to_fen
    from losses import to_pawns

    rows = np.array(dataset.positions[:count])
    fens = [row_to_fen(row) for row in rows]
    boards = [chess.svg.board(chess.Board(fen), size=160) for fen in fens]
    targets = dataset.targets[:count].tolist()

    @torch.no_grad()
    def log(run) -> None:
        if not count or run.cfg.log.logger == "none":
            return
        # Every rank runs the forward: under FSDP it gathers parameters from all of them.
        module = getattr(run.model, "_original_module", run.model)
        packed = torch.from_numpy(rows).to(run.fabric.device)
        was_training = module.training
        module.eval()
        predictions = to_pawns(module(packed), run.cfg.data.target).tolist()
        module.train(was_training)
        if run.loggers is None:
            return
        table = [[fen, target, prediction, board] for fen, target, prediction, board in zip(fens, targets, predictions, boards)]
        run.loggers.log_table("val/predictions", ["fen", "target", "prediction", "board"], table, run.step)

    return {"on_validation_end": [log]}


# ---------------------------------------------------------------- early stopping


def improved(score: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    return best is None or (score < best - min_delta if mode == "min" else score > best + min_delta)


def early_stopping(patience: int, min_delta: float = 0.0) -> Hooks:
    """Stop after `patience` validations without a better monitored metric. The metric is reduced
    over ranks, so every rank takes the same decision."""

    def check(run) -> None:
        score = run.val_metrics[run.cfg.checkpoint.monitor]
        if improved(score, run.early_stop_best, run.cfg.checkpoint.mode, min_delta):
            run.early_stop_best, run.bad_validations = score, 0
            return
        run.bad_validations += 1
        if run.bad_validations >= patience:
            run.fabric.print(f"early stopping: {run.cfg.checkpoint.monitor} has not improved for {patience} validations")
            run.should_stop = True

    return {"on_validation_end": [check]}


# ---------------------------------------------------------------- checkpoints


def checkpointing() -> Hooks:
    """At every validation: write step-N.ckpt, keep the best k by the monitored metric, point
    last.ckpt at it. With checkpoint.every, also refresh last.ckpt every N steps."""

    def at_validation(run) -> None:
        ckpt = run.cfg.checkpoint
        path = run.run_dir / "checkpoints" / f"step-{run.step:08d}.ckpt"
        score = run.val_metrics[ckpt.monitor]
        run.best.append((score, path.name))
        run.best.sort(key=lambda item: item[0], reverse=ckpt.mode == "max")
        dropped = run.best[ckpt.keep_best:] if ckpt.keep_best > 0 else []
        del run.best[len(run.best) - len(dropped):]
        checkpoints.save(run, path)
        checkpoints.link_last(run, path)
        if run.fabric.is_global_zero:
            for _, name in dropped:
                checkpoints.remove(run.run_dir / "checkpoints" / name)
            if run.loggers is not None and run.cfg.log.checkpoint_artifacts:
                aliases = ["last", f"step-{run.step}"] + (["best"] if run.best[0][1] == path.name else [])
                # from last.ckpt (the same file): `path` itself is gone if it did not make the best k
                run.loggers.log_checkpoint(path.parent / "last.ckpt", path.name, aliases, [name for _, name in dropped])

    def every_n(run) -> None:
        every = run.cfg.checkpoint.every
        if every and run.step % every == 0 and not run.validated_this_step:
            checkpoints.save(run, run.run_dir / "checkpoints" / "last.ckpt")

    return {"on_validation_end": [at_validation], "after_step": [every_n]}
