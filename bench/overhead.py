"""What the trainer costs over a hand-written loop: the chess evaluator trained for a fixed number of steps by

  raw        a plain PyTorch loop (our loader, flip augmentation, AdamW, the LR function, clipping)
  fabric     the same loop through bare Fabric (setup_module/setup_optimizers/backward, nothing else)
  kibitz     train.py with its defaults: metrics.csv every 50 steps, norms, histograms every 100 steps,
             non-finite guard (validation only after the last step; the progress bar off)
  lightning  the Lightning Trainer with an equivalent LightningModule, from .venv/bench-lightning/ (.ci/run fills it:
             `pip install --no-deps --target .venv/bench-lightning lightning pytorch-lightning torchmetrics`),
             self.log every step at Trainer's default interval (50), its CSVLogger, clipping, the same LR

    python bench/overhead.py                            # both sizes, 3 interleaved rounds
    python bench/overhead.py --sizes tiny --rounds 1 --tiny-steps 200   # a smoke test in seconds

Sizes: default (4 x 808 MLP, batch 512) and tiny (one hidden layer of 32, batch 64), where the step is so
short that per-step framework cost dominates. Time per step is read by a global optimizer step hook,
from step 20 to the last, so setup, the final validation and test are outside it; medians over rounds.
Host syncs are counted in a separate instrumented run: every Python-level device->host read of a tensor
(item, tolist, numpy, bool/int/float of a tensor) outside torch's own host-side bookkeeping, attributed to
the interval between two optimizer steps. kibitz reads only at its log steps (every 50: the loss, norms) and
while taking histograms (every 100, inside that step's backward, so between steps 99 and 100); the latter
read exists on CPU only, where the histogram range is read to pick a cheaper binning (no device to wait for).
Finally the raw loop's and kibitz's weights are compared bit for bit (fp32, same seed).
"""

import argparse
import contextlib
import io
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the trainer's modules
LIGHTNING_ENV = ROOT / ".venv/bench-lightning"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

import data  # noqa: E402
import schedules  # noqa: E402
import train  # noqa: E402
from chessdata.encoding import random_flip  # noqa: E402
from chessdata.prepare import ensure_prepared  # noqa: E402
from config import TrainConfig  # noqa: E402
from model import ChessEvaluator  # noqa: E402
from tasks import chess as chess_task  # noqa: E402
from tasks.chess import ChessConfig, ChessData, ChessLog, ChessModelConfig  # noqa: E402

SIZES = {"default": (808, 4, 512), "tiny": (32, 1, 64)}  # width, depth, batch
WARMUP_STEPS = 20
SEED = 1337


class StepClock:
    """A global optimizer post-step hook: the time of every step, and the host syncs before it."""

    def __init__(self):
        self.times, self.syncs, self.pending = [], [], 0
        self.handle = register_optimizer_step_post_hook(self.tick)

    def tick(self, optimizer, args, kwargs) -> None:
        self.times.append(time.perf_counter())
        self.syncs.append(self.pending)
        self.pending = 0

    def close(self) -> None:
        self.handle.remove()

    def seconds_per_step(self) -> float:
        window = self.times[WARMUP_STEPS:]
        return (window[-1] - window[0]) / (len(window) - 1)


@contextlib.contextmanager
def counting_syncs(clock: StepClock):
    """Count device->host reads of tensors (on a GPU each one waits for the device). Reads made inside
    torch.optim and torch.utils.data are left out: they are of host tensors by design (Adam's step
    counters, sampler indices), never a wait for the device."""
    names = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    host_side = (f"torch{os.sep}optim{os.sep}", f"torch{os.sep}utils{os.sep}data{os.sep}")

    def counted(original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not any(part in caller for part in host_side):
                clock.pending += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def base_config(size: str, steps: int, out: Path) -> ChessConfig:
    width, depth, batch = SIZES[size]
    return ChessConfig(
        model=ChessModelConfig(width, depth),
        data=ChessData(batch_size=batch),
        train=TrainConfig(max_steps=steps, val_every=10**9, seed=SEED),
        log=ChessLog(logger="csv", progress_bar=False, predictions=0),
        out_dir=out,
    )


def lr_function(cfg: ChessConfig):
    return schedules.lr_function(cfg.schedule, cfg.optim.lr, cfg.train.max_steps)  # the trainer's own: the same floats


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def endless(loader):
    epoch = 0
    while True:
        loader.sampler.start_epoch(epoch)
        yield from loader
        epoch += 1


def raw_loop(cfg: ChessConfig, fabric=None) -> dict:
    """The hand-written loop; with `fabric`, the same loop through bare Fabric."""
    seed_all(SEED)
    loader = data.make_loader(
        chess_task.chess_datasets(cfg)["train"], batch_size=cfg.data.batch_size, shuffle=True, seed=SEED, drop_last=True
    )
    model = ChessEvaluator(cfg.model.width, cfg.model.depth)
    optimizer = train.make_optimizer(model, cfg.optim, fused=False)
    if fabric:
        model, optimizer = fabric.setup_module(model), fabric.setup_optimizers(optimizer)
    lr_at = lr_function(cfg)
    batches = endless(loader)
    for step in range(cfg.train.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        packed, pawns = random_flip(*next(batches))
        loss = F.l1_loss(model(packed), pawns)
        fabric.backward(loss) if fabric else loss.backward()
        # Over the optimizer's parameters, the order Fabric clips in: the norm then sums in the same order.
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.train.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def kibitz_loop(cfg: ChessConfig) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        train.train(cfg, chess_task.CHESS)
    run_dir = max(cfg.out_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["model"]


def lightning_loop(cfg: ChessConfig) -> dict:
    sys.path.insert(0, str(LIGHTNING_ENV))  # where .ci/run installs it (or `pip install lightning` anywhere)
    import lightning as L

    lr_at = lr_function(cfg)

    class Evaluator(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = ChessEvaluator(cfg.model.width, cfg.model.depth)

        def training_step(self, batch, batch_index):
            packed, pawns = random_flip(*batch)
            loss = F.l1_loss(self.model(packed), pawns)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            optimizer = train.make_optimizer(self.model, cfg.optim, fused=False)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step) / cfg.optim.lr)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    seed_all(SEED)
    loader = data.make_loader(
        chess_task.chess_datasets(cfg)["train"], batch_size=cfg.data.batch_size, shuffle=True, seed=SEED, drop_last=True
    )
    module = Evaluator()
    trainer = L.Trainer(
        max_steps=cfg.train.max_steps,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=cfg.train.clip,
        logger=L.pytorch.loggers.CSVLogger(cfg.out_dir),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(module, loader)
    return {k.removeprefix("model."): v for k, v in module.state_dict().items()}


def run_arm(arm: str, size: str, steps: int, count_syncs: bool = False) -> tuple[StepClock, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = base_config(size, steps, Path(tmp))
        clock = StepClock()
        try:
            with counting_syncs(clock) if count_syncs else contextlib.nullcontext():
                if arm == "raw":
                    weights = raw_loop(cfg)
                elif arm == "fabric":
                    weights = raw_loop(cfg, train.Fabric(accelerator="cpu", devices=1))
                elif arm == "kibitz":
                    weights = kibitz_loop(cfg)
                else:
                    weights = lightning_loop(cfg)
        finally:
            clock.close()
    return clock, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["default", "tiny"], choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--default-steps", type=int, default=200)
    parser.add_argument("--tiny-steps", type=int, default=2000)
    parser.add_argument("--arms", nargs="+", default=["raw", "fabric", "kibitz", "lightning"])
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    ensure_prepared([Path("data/sample.pgn.zst")], Path("data/cache/sample"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; "
        f"medians of {args.rounds} interleaved rounds"
    )

    results, identical = {}, {}
    for size in args.sizes:
        steps = args.default_steps if size == "default" else args.tiny_steps
        times = {arm: [] for arm in args.arms}
        weights = {}
        for _ in range(args.rounds):
            for arm in args.arms:
                clock, weights[arm] = run_arm(arm, size, steps)
                times[arm].append(clock.seconds_per_step())
        syncs = {}
        for arm in args.arms:
            clock, _ = run_arm(arm, size, min(steps, 120), count_syncs=True)
            per_step = clock.syncs[1:]  # reads before the first step are setup
            syncs[arm] = (sum(per_step) / len(per_step), sum(1 for s in per_step if s), len(per_step))
            where = [step for step, count in enumerate(per_step, start=1) if count]  # between step n and n+1
            print(f"  {size} {arm}: host reads between optimizer steps n and n+1 for n in {where or 'none'}")
        results[size] = {arm: (statistics.median(times[arm]), syncs[arm]) for arm in args.arms}
        if "raw" in weights and "kibitz" in weights:
            identical[size] = all(torch.equal(weights["raw"][k], weights["kibitz"][k]) for k in weights["raw"])

    print(f"\n{'size':<9}{'arm':<11}{'ms/step':>10}{'x raw':>8}{'syncs/step':>12}{'steps with a sync':>20}")
    for size, arms in results.items():
        raw = arms.get("raw", (math.nan,))[0]
        for arm, (seconds, (mean_syncs, with_sync, counted)) in arms.items():
            print(
                f"{size:<9}{arm:<11}{seconds * 1e3:>10.3f}{seconds / raw:>8.3f}{mean_syncs:>12.2f}"
                f"{f'{with_sync} of {counted}':>20}"
            )
    print("\nratios (time per step against the raw loop)")
    for size, arms in results.items():
        raw = arms["raw"][0] if "raw" in arms else math.nan
        print(
            "  "
            + size
            + ": "
            + ", ".join(f"{arm} {seconds / raw:.3f}x" for arm, (seconds, _) in arms.items() if arm != "raw")
        )
    for size, same in identical.items():
        print(f"final weights, raw loop vs kibitz ({size}, fp32, seed {SEED}): {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
