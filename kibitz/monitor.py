"""The monitoring (`--monitor.*`): what the model does while it trains, watched without slowing it. Weight and
gradient statistics and histograms computed on the device with no host sync per tensor, one non-blocking copy
of all results, payloads built and sent by a background thread; gradient norms, update ratios, MFU and memory.

Why: a TensorBoard `add_histogram` of every weight and gradient in a Lightning hook took 96 % of each
training step of a 4-layer MLP (float64 copies, numpy binning, a sync per tensor). Here, for every
tensor: min, max, mean, std, L2 norm and a `bins`-bin histogram over the tensor's own range, built
with index_add_ (torch.histc would need its range as Python floats: a sync per tensor).
"""

import torch

import data
from callbacks import loss_of
from kibitz.distributed import local

STAT_FIELDS = ("min", "max", "mean", "std", "norm")


def tensor_stats(
    tensors: list[torch.Tensor],
    bins: int,
    max_elements: int | None = None,
    scale: torch.Tensor | None = None,
    moments: bool = False,
) -> torch.Tensor:
    """(len(tensors), 5 + bins) float32 on the tensors' device: min, max, mean, std, norm, counts.
    `max_elements` samples a strided subset of huge tensors; `scale` divides first (AMP unscaling).
    Histograms take two passes over each tensor (min and max, then the binning: on a CPU it is
    memory-bound); the exact mean, std and norm cost two more, so only with `moments` (else NaN)."""
    rows = []
    nan = torch.tensor(float("nan"))
    for tensor in tensors:
        flat = tensor.detach().reshape(-1).float()
        if max_elements is not None and flat.numel() > max_elements:
            flat = flat[:: -(-flat.numel() // max_elements)]
        if scale is not None:
            flat = flat / scale
        lo, hi = torch.aminmax(flat)
        n = flat.numel()
        if moments:
            total, squares = flat.sum(), torch.dot(flat, flat)
            mean = total / n
            extra = torch.stack([mean, (squares / n - mean * mean).clamp_min(0).sqrt(), squares.sqrt()])
        else:
            extra = nan.to(flat.device).expand(3)
        if flat.device.type == "cpu" and bins <= 256:  # no device to sync with; uint8 bin indices are
            if hi > lo:  # a quarter of int64's memory traffic (histc: 2x slower)
                index = ((flat - lo) * (bins / (hi - lo))).to(torch.uint8).clamp_(max=bins - 1)
                counts = torch.bincount(index, minlength=bins).float()
            else:
                counts = torch.zeros(bins)
                counts[0] = n
        else:  # the range stays on the device: bin indices, then index_add_ (histc would read it back)
            width = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
            index = ((flat - lo) * (bins / width)).long().clamp_(0, bins - 1)  # x == hi: the last bin
            counts = torch.zeros(bins, device=flat.device).index_add_(0, index, torch.ones_like(flat))
        rows.append(torch.cat([torch.stack([lo, hi]), extra, counts]))
    return torch.stack(rows)


def gather_shares(
    fabric, names: list[str], tensors: list[torch.Tensor], bins: int, max_elements: int | None, scale=None
) -> torch.Tensor | None:
    """Under DDP every rank holds the same weights and reduced gradients: rank r computes the stats
    of tensors r, r + world, ... and rank 0 gathers them in the original order (None elsewhere)."""
    world, rank = fabric.world_size, fabric.global_rank
    mine = list(range(rank, len(tensors), world))
    stats = tensor_stats([tensors[i] for i in mine], bins, max_elements, scale) if mine else None
    if world == 1:
        return stats
    per_rank = -(-len(tensors) // world)
    padded = torch.zeros(per_rank, 5 + bins, device=fabric.device)
    if stats is not None:
        padded[: len(stats)] = stats
    gathered = fabric.all_gather(padded)  # (world, per_rank, 5 + bins): small, and only on logging steps
    if rank != 0:
        return None
    ordered = torch.empty(len(tensors), 5 + bins, device=fabric.device)
    for r in range(world):
        count = len(range(r, len(tensors), world))
        ordered[r::world] = gathered[r, :count]
    return ordered


def sharded_stats(fabric, shards: list[torch.Tensor], bins: int, scale=None) -> torch.Tensor | None:
    """Under FSDP each rank holds a shard of every tensor: every rank takes part. The range of each
    tensor is combined first (one all-reduce), each rank bins its shard over that common range, and
    the counts and moments are summed (a second all-reduce); rank 0 gets the rows of `tensor_stats`
    (None elsewhere). Moments are exact here: they cost one more sum each."""
    device = fabric.device
    flats = [
        s.detach().reshape(-1).float() / scale if scale is not None else s.detach().reshape(-1).float() for s in shards
    ]
    inf = torch.tensor(float("inf"), device=device)
    lo = torch.stack([f.min() if f.numel() else inf for f in flats])  # a rank may hold nothing of a small tensor
    hi = torch.stack([f.max() if f.numel() else -inf for f in flats])
    ranges = fabric.all_reduce(torch.stack([-lo, hi]), reduce_op="max")
    lo, hi = -ranges[0], ranges[1]
    rows = []
    for flat, low, high in zip(flats, lo, hi):
        width = torch.where(high > low, high - low, torch.ones_like(high))
        index = ((flat - low) * (bins / width)).long().clamp_(0, bins - 1)
        counts = torch.zeros(bins, device=device).index_add_(0, index, torch.ones_like(flat))
        moments = torch.stack([flat.sum(), torch.dot(flat, flat), torch.tensor(float(flat.numel()), device=device)])
        rows.append(torch.cat([moments, counts]))
    summed = fabric.all_reduce(torch.stack(rows), reduce_op="sum")
    if fabric.global_rank != 0:
        return None
    total, squares, n = summed[:, 0], summed[:, 1], summed[:, 2].clamp_min(1)
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(0).sqrt()
    return torch.cat([torch.stack([lo, hi, mean, std, squares.sqrt()], dim=1), summed[:, 3:]], dim=1)


# ---------------------------------------------------------------- the hooks


def hooks(cfg, log_every: int) -> dict:
    """Weight/gradient statistics and histograms, gradient norms and update ratios, MFU and memory, as hooks that
    observe. The loop takes each step's per-layer gradient norms (run.grad_norms); this keeps those of a logging
    step and the weights before its update, and reads them all in one transfer at the log. Under FSDP and FSDP2
    each rank holds a part of every parameter: statistics are combined across ranks."""
    state: dict = {}

    def start(run) -> None:
        state["mfu"] = mfu_setup(run)
        state["histograms_at"] = run.step // cfg.histogram_every if cfg.histogram_every else 0

    def before_log_update(run) -> None:
        step = run.step + 1  # the step these gradients belong to
        if cfg.norms:
            state["grad_norms"] = run.grad_norms
            state["before"] = [local(p).detach().clone() for p in run.params]
        if cfg.histogram_every and step // cfg.histogram_every > state["histograms_at"]:  # a multiple passed
            state["histograms_at"] = step // cfg.histogram_every
            send_histograms(run, cfg, step)

    def on_log(run) -> dict:
        row, names = {}, run.param_names
        if "before" in state and state["grad_norms"] is not None:
            before, norms = state.pop("before"), state.pop("grad_norms")
            deltas = torch._foreach_sub([local(p.detach()) for p in run.params], before)
            delta_norms = torch.stack(torch._foreach_norm(deltas))
            weight_norms = torch.stack(torch._foreach_norm(before))
            if run.sharded:  # the norm of a whole tensor from its parts' norms: one all-reduce
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

    return {"on_train_start": [start], "before_log_update": [before_log_update], "on_log": [on_log]}


def send_histograms(run, cfg, step: int) -> None:
    """Every weight's and gradient's histogram and statistics, binned on the device and sent by the loggers' thread."""
    params, names = [local(p) for p in run.params], run.param_names
    grads = [local(p.grad) if p.grad is not None else torch.zeros_like(q) for p, q in zip(run.params, params)]
    scaler = getattr(run.fabric.strategy.precision, "scaler", None)
    scale = scaler._get_scale_async() if scaler is not None else None  # a tensor: no sync
    for prefix, tensors, by in (("gradients", grads, scale), ("parameters", params, None)):
        if run.sharded:  # every rank bins its part (max_elements does not apply)
            stats = sharded_stats(run.fabric, tensors, cfg.bins, by)
        else:
            stats = gather_shares(run.fabric, names, tensors, cfg.bins, cfg.max_elements, by)
        if stats is not None and run.loggers is not None:
            run.loggers.send_histograms(step, prefix, names, stats)


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
            loader = data.make_loader(train, batch_size=micro_batch, drop_last=True, collate=run.task.collate)
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
