"""Hooks: plain functions `hook(run)` that the loop in train.py calls at named points. They observe:
the loop's values flow to them, and the only thing a hook may change is `run.should_stop`.

Points: `on_train_start`, `after_backward` (the gradients are there, `run.grad_norms` holds their
per-layer norms), `after_step`, `on_log` (every log.every steps, the training values in `run.log_row`;
a hook may return a dict of values, which the loop adds to the row for the hooks after it and the
loggers), `on_validation_end` (metrics in `run.val_metrics`), `on_train_end`, `on_test_end` (after the
test of the best checkpoint, before the loggers close). A factory below returns {point: [functions]} for
one concern; `merge` joins them. Nothing here syncs with the device except where it says so. A task adds
its own (chess's table of predictions, the test pictures of figures.py) through Task.hooks.
"""

import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
from config import ConfigError

Hooks = dict[str, list]
POINTS = (
    "on_train_start",
    "after_backward",
    "after_step",
    "on_log",
    "on_validation_end",
    "on_train_end",
    "on_test_end",
)


def merge(*groups: Hooks) -> Hooks:
    """One dict of hooks from several; a point the loop never calls (a misspelt name) is an error, not a no-op."""
    merged: Hooks = {}
    for group in groups:
        for point, functions in group.items():
            if point not in POINTS:
                raise ConfigError(
                    f"hooks: {point!r} is not a point the loop calls (expected one of {', '.join(POINTS)})"
                )
            merged.setdefault(point, []).extend(functions)
    return merged


def call(hooks: Hooks, point: str, run) -> None:
    for hook in hooks.get(point, []):
        values = hook(run)
        if values:  # on_log: a hook's values join the row (the loop writes them, not the hook)
            run.log_row.update(values)


# ---------------------------------------------------------------- progress, throughput, LR


def throughput() -> Hooks:
    """samples/s, steps/s (tokens/s for a model with `tokens_per_sample`) and the share of time spent
    waiting for data, measured between log intervals (wall clock)."""
    last = {"time": None, "step": 0}

    def start(run) -> None:
        last["time"], last["step"] = time.perf_counter(), run.step

    def measure(run) -> dict:
        now = time.perf_counter()
        steps, row = run.step - last["step"], {}
        if last["time"] is not None and steps > 0:
            seconds = now - last["time"]
            row["perf/steps_per_s"] = steps / seconds
            row["perf/samples_per_s"] = steps * run.cfg.data.batch_size / seconds
            tokens = getattr(getattr(run.model, "_original_module", run.model), "tokens_per_sample", None)
            if tokens:  # a sequence model: tokens/s as well
                row["perf/tokens_per_s"] = row["perf/samples_per_s"] * tokens
            row["perf/data_wait_pct"] = 100 * run.data_wait_s / seconds
        last["time"], last["step"] = now, run.step
        return row

    return {"on_train_start": [start], "on_log": [measure]}


def progress_bar(total_steps: int | None) -> Hooks:
    """tqdm on rank 0: advances every step (no sync), shows the last logged values. Off a terminal (a SLURM .out
    file, a pipe) it is drawn once per log interval, not ten times a second."""
    bar = {}

    def start(run) -> None:
        if run.fabric.is_global_zero:
            terminal = sys.stderr.isatty()
            bar["tqdm"] = tqdm(
                total=total_steps,
                initial=run.step,
                desc=run.cfg.task,
                unit="step",
                dynamic_ncols=True,
                smoothing=0.1,
                mininterval=0.1 if terminal else math.inf,
            )

    def advance(run) -> None:
        if "tqdm" in bar:
            bar["tqdm"].update(1)

    def show(run) -> None:
        if "tqdm" in bar:
            row = run.log_row
            bar["tqdm"].set_postfix(
                loss=f"{row.get('train/loss', math.nan):.3f}",
                lr=f"{run.lr:.2e}",
                samples_s=f"{row.get('perf/samples_per_s', 0):.0f}",
                refresh=False,
            )
            if bar["tqdm"].mininterval == math.inf:
                bar["tqdm"].refresh()

    def close(run) -> None:
        if "tqdm" in bar:
            bar.pop("tqdm").close()

    return {"on_train_start": [start], "after_step": [advance], "on_log": [show], "on_train_end": [close]}


def curves(min_interval_s: float = 60.0) -> Hooks:
    """`curves.png` in the run folder, drawn from metrics.csv on rank 0: the training loss, the task's validation
    metrics and the learning rate. Redrawn after a validation (at most once a minute: drawing takes ~0.2 s)
    and at the end, whatever the logger, so a run without a tracker account still has its picture."""
    last = {"drawn": -math.inf, "failed": False}

    def draw(run, force: bool = False) -> None:
        due = force or time.monotonic() - last["drawn"] >= min_interval_s
        # not with --log.logger none (no metrics.csv); a picture that cannot be drawn never stops training
        if run.fabric.is_global_zero and due and not last["failed"] and (run.run_dir / "metrics.csv").is_file():
            try:
                plot_curves(run.run_dir / "metrics.csv", run.run_dir / "curves.png", list(run.task.metrics))
            except Exception as exc:
                last["failed"] = True
                print(f"warning: curves.png not drawn ({type(exc).__name__}: {exc}); training continues", flush=True)
            last["drawn"] = time.monotonic()

    return {"on_validation_end": [draw], "on_train_end": [lambda run: draw(run, force=True)]}


def plot_curves(metrics_csv: Path, path: Path, val_names: list[str]) -> None:
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend and figures are left alone

    from loggers import metric_rows

    series: dict[str, tuple[list, list]] = {}
    for step, name, value in metric_rows(metrics_csv):
        steps, values = series.setdefault(name, ([], []))
        steps.append(int(step))
        values.append(float(value))
    panels = [
        ("training loss", ["train/loss"]),
        ("validation", [n for n in val_names if n in series]),
        ("lr", ["train/lr"]),
    ]
    fig = Figure(figsize=(15, 4))
    for ax, (title, names) in zip(fig.subplots(1, len(panels)), panels):
        for name in names:
            if name in series:
                ax.plot(*series[name], label=name, marker="o" if title == "validation" else None, markersize=3)
        ax.set(title=title, xlabel="step")
        if title != "lr" and any(name in series for name in names):  # nothing logged yet: no legend (and no warning)
            ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 90) -> None:
    """Write a matplotlib Figure as a PNG in one rename: a reader (a browser refreshing it) never sees half."""
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    tmp.replace(path)


# ---------------------------------------------------------------- MFU

# Dense peaks in FLOP/s (bf16/fp16, TF32, fp32) where Fabric 2.6.6's table is wrong: it gives the sparse
# figures for H100 NVL and the H200 parts and does not match a plain "NVIDIA H200" (NVIDIA's datasheets).
DENSE_PEAKS = {
    "H200 NVL": (835e12, 417e12, 60e12),
    "H200": (989e12, 494e12, 67e12),
    "H100 NVL": (835e12, 417e12, 60e12),
}


def dense_peak(device_name: str, dtype: torch.dtype, matmul_precision: str) -> float | None:
    """Our override for a device Fabric's table gets wrong; None = ask Fabric."""
    for key, (half, tf32, fp32) in DENSE_PEAKS.items():
        if key in device_name:
            if dtype in (torch.bfloat16, torch.float16):
                return half
            return (fp32 if matmul_precision == "highest" else tf32) if dtype == torch.float32 else None
    return None


def compute_dtype(fabric) -> torch.dtype:
    """The dtype the matmuls run in, from the precision plugin Fabric actually built (a launcher's
    --precision included), not from our config."""
    from lightning_fabric.utilities.throughput import _plugin_to_compute_dtype

    return _plugin_to_compute_dtype(fabric.strategy.precision)


def device_peak(fabric, given_tflops: float | None, dtype: torch.dtype) -> tuple[float, str] | None:
    """One device's peak FLOP/s for `dtype` (fp32 matmuls count as TF32 unless the matmul precision is
    "highest") and where it came from."""
    if given_tflops:
        return given_tflops * 1e12, "--monitor.peak-tflops"
    if fabric.device.type != "cuda":
        return None  # Fabric knows no CPU peaks
    from lightning_fabric.utilities.throughput import get_available_flops

    name = torch.cuda.get_device_name(fabric.device)
    peak = dense_peak(name, dtype, torch.get_float32_matmul_precision())
    if peak:
        return peak, f"{name}, dense"
    peak = get_available_flops(fabric.device, dtype)  # warns once for a device it does not know
    return (float(peak), f"{name}, Fabric's table") if peak else None


def flops_per_sample(task, cfg, batch, train_size: int | None, samples: int) -> float:
    """FLOPs of one training sample: Fabric's measure_flops (torch's FlopCounterMode: matmuls, convolutions,
    attention) over the task's own training step, forward, loss and backward, on a copy of the model on the
    meta device, so nothing is computed or allocated. `batch` is a real micro-batch (only its shapes and
    dtypes are used)."""
    from lightning_fabric.utilities.apply_func import apply_to_collection
    from lightning_fabric.utilities.throughput import measure_flops

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # draws nothing from the run's generator
        model = task.build_model(cfg)
        inputs = apply_to_collection(batch, torch.Tensor, lambda t: torch.empty_like(t, device="meta"))
        flops = measure_flops(model, lambda: loss_of(task.train_step(cfg, model, inputs, 0, train_size)), lambda x: x)
    return flops / samples


def mfu_setup(run) -> tuple[float, float] | None:
    """(FLOPs a sample, one device's peak) for perf/mfu, or None when either is unknown (rank 0 says which)."""
    dtype = compute_dtype(run.fabric)
    peak = device_peak(run.fabric, run.cfg.monitor.peak_tflops, dtype)
    if peak is None:
        return None
    micro_batch = run.cfg.data.batch_size // (run.cfg.train.accumulate * run.fabric.world_size)
    train = run.datasets["train"]
    try:
        with torch.random.fork_rng(devices=[]):  # one real batch, for its shapes: the run's loader is not touched
            loader = data.make_loader(train, micro_batch, False, 0, 0, 1, drop_last=True, collate=run.task.collate)
            batch = next(iter(loader))
        size = len(train) if hasattr(train, "__len__") else None
        flops = flops_per_sample(run.task, run.cfg, batch, size, micro_batch)
    except Exception as exc:  # a step that reads values (.item(), data-dependent shapes) cannot run on meta
        run.fabric.print(f"warning: no MFU: the training step does not run on the meta device ({exc})")
        return None
    if not flops:
        return None
    matmuls = "tf32" if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else dtype
    run.fabric.print(
        f"MFU per device: {flops / 1e6:.4g} MFLOP a training sample (measured), against {peak[0] / 1e12:g} TFLOP/s "
        f"({peak[1]}; {str(matmuls).removeprefix('torch.')} matmuls)"
    )
    return flops, peak[0]


# ---------------------------------------------------------------- weights, gradients, MFU


def monitoring(cfg, log_every: int) -> Hooks:
    """Weight/gradient statistics and histograms, gradient norms and update ratios, MFU and memory.
    The loop takes each step's per-layer gradient norms (run.grad_norms); this keeps those of a
    logging step and the weights before its update, and reads them all in one transfer at the log."""
    import monitor

    state: dict = {}

    def start(run) -> None:
        state["mfu"] = mfu_setup(run)
        state["sharded"] = run.sharded
        if cfg.histogram_every and run.fabric.is_global_zero and run.loggers is not None:
            run.loggers.sender = monitor.Sender(run.loggers)

    def local(tensors: list) -> list:  # under FSDP2 parameters are DTensors: statistics use each rank's shard
        return [t.to_local() for t in tensors] if state["sharded"] else tensors

    def after_backward(run) -> None:
        step = run.step + 1  # the step these gradients belong to
        params, names = local(run.params), run.param_names
        if cfg.norms and (step % log_every == 0 or step == run.total_steps):
            state["grad_norms"] = run.grad_norms
            state["before"] = [p.detach().clone() for p in params]
        if cfg.histogram_every and step % cfg.histogram_every == 0:
            grads = local([p.grad if p.grad is not None else torch.zeros_like(p) for p in run.params])
            scaler = getattr(run.fabric.strategy.precision, "scaler", None)
            scale = scaler._get_scale_async() if scaler is not None else None  # a tensor: no sync
            for prefix, tensors, by in (("gradients", grads, scale), ("parameters", params, None)):
                if run.sharded:  # every rank bins its shard (max_elements does not apply)
                    stats = monitor.sharded_stats(run.fabric, tensors, cfg.bins, by)
                else:
                    stats = monitor.gather_shares(run.fabric, names, tensors, cfg.bins, cfg.max_elements, by)
                if stats is not None and run.loggers is not None:
                    run.loggers.sender.send(step, prefix, names, stats)

    def on_log(run) -> dict:
        row, names = {}, run.param_names
        if "before" in state and state["grad_norms"] is not None:
            before, norms = state.pop("before"), state.pop("grad_norms")
            deltas = torch._foreach_sub([p.detach() for p in local(run.params)], before)
            delta_norms = torch.stack(torch._foreach_norm(deltas))
            weight_norms = torch.stack(torch._foreach_norm(before))
            if run.sharded:  # the norm of a whole tensor from its shards' norms: one all-reduce
                squares = torch.stack([norms, delta_norms, weight_norms]).square()
                norms, delta_norms, weight_norms = run.fabric.all_reduce(squares, reduce_op="sum").sqrt()
            ratios = delta_norms / weight_norms.clamp_min(1e-12)
            values = torch.cat([norms.norm().reshape(1), norms, ratios]).tolist()  # one transfer for all of it
            row["grad_norm/total"] = values[0]
            row.update({f"grad_norm/{n}": v for n, v in zip(names, values[1 : 1 + len(names)])})
            row.update({f"update_ratio/{n}": v for n, v in zip(names, values[1 + len(names) :])})
        if "perf/samples_per_s" in run.log_row:
            if state["mfu"]:  # per device: the global rate over the devices, against one device's peak
                flops, peak = state["mfu"]
                row["perf/mfu"] = run.log_row["perf/samples_per_s"] / run.fabric.world_size * flops / peak
            if run.fabric.device.type == "cuda":
                row["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(run.fabric.device) / 2**30
        return row

    def end(run) -> None:
        if run.loggers is not None and run.loggers.sender is not None:
            run.loggers.sender.flush()

    return {"on_train_start": [start], "after_backward": [after_backward], "on_log": [on_log], "on_train_end": [end]}


def loss_of(result):
    """The loss of what a train_step returned: the loss alone, or (loss, values to log)."""
    return result[0] if isinstance(result, tuple) else result


def improved(score: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if not math.isfinite(score):  # a NaN metric never improves on anything
        return False
    return best is None or (score < best - min_delta if mode == "min" else score > best + min_delta)
