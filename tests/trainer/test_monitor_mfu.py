"""MFU: FLOPs counted by Fabric's measure_flops on a meta copy of the task's real step, per-device peaks."""

import numpy as np
import pytest
import torch
from lightning_fabric.utilities.throughput import measure_flops

from callbacks import loss_of
from kibitz import monitor
from tasks import TASKS, dvae


def micro_batch(task, cfg, size: int = 32):
    datasets = task.datasets(cfg)
    return list(datasets["train"][np.arange(size)]), len(datasets["train"])


@pytest.mark.parametrize("name, tcvae", [("chess", False), ("dvae", False), ("dvae", True)])
def test_flops_per_sample_equal_measure_flops_of_the_real_step(prepared, name, tcvae):
    """The meta-device count is what measure_flops gives for the task's training step run for real on a real
    model and batch: the same ops, forward, loss and backward, with nothing computed for the count itself."""
    task = TASKS[name]
    cfg = task.config()
    cfg.data.dir = prepared
    if tcvae:
        cfg.dvae.tcvae = True  # its terms compare every pair of the batch: not a per-sample cost
    batch, train_size = micro_batch(task, cfg)
    counted = monitor.flops_per_sample(task, cfg, batch, train_size, len(batch[0]))
    torch.manual_seed(0)
    model = task.build_model(cfg)
    real = measure_flops(model, lambda: loss_of(task.train_step(cfg, model, batch, 0, train_size)), lambda loss: loss)
    assert counted == real / len(batch[0]) > 0
    if name == "chess":  # the MLP by hand: forward 2 and weight gradient 2 per multiply-add, input gradient 2 but
        widths = [808] * (cfg.model.depth + 1) + [1]  # not for the first layer, whose input needs none
        macs = [a * b for a, b in zip(widths, widths[1:])]
        assert counted == pytest.approx(6 * sum(macs) - 2 * macs[0], rel=1e-4)


def test_the_meta_count_draws_nothing_from_the_runs_generator(prepared):
    cfg = dvae.DVAEConfig()
    cfg.data.dir = prepared
    batch, train_size = micro_batch(dvae.DVAE, cfg)
    torch.manual_seed(5)
    monitor.flops_per_sample(dvae.DVAE, cfg, batch, train_size, len(batch[0]))  # builds the model, draws Gumbel noise
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_dense_peaks_override_only_where_fabrics_table_is_wrong():
    assert monitor.dense_peak("NVIDIA H200", torch.bfloat16, "high") == 989e12
    assert monitor.dense_peak("NVIDIA H200", torch.float32, "high") == 494e12  # TF32 matmuls
    assert monitor.dense_peak("NVIDIA H200", torch.float32, "highest") == 67e12  # plain fp32
    assert monitor.dense_peak("NVIDIA H200 NVL", torch.float16, "high") == 835e12
    assert monitor.dense_peak("NVIDIA H100 NVL", torch.bfloat16, "medium") == 835e12
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L4", "Tesla T4"):  # Fabric's table
        assert monitor.dense_peak(name, torch.bfloat16, "high") is None
