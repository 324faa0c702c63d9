"""Under FSDP (FSDP1, GPU only) each rank holds a flat slice of every parameter, as under FSDP2 it holds a shard: the
loop treats both as sharded. What that takes, run here on 2 CPU processes with parameters cut the way FSDP1 cuts
them (a rank may hold nothing of a small one): a non-finite value one rank sees is seen by every rank (or that
rank alone would stop and save, and the others hang), and a histogram is of the whole parameter, not one slice."""

import pytest
from conftest import ROOT, run_script

SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import torch
from lightning_fabric import Fabric

from kibitz import monitor
from kibitz import nonfinite

fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
fabric.launch()
rank = fabric.global_rank
first, second = torch.arange(7.0) - 3, torch.ones(3)
parts = [first[:4], second] if rank == 0 else [first[4:], torch.empty(0)]

bad = torch.tensor([[rank == 1, False]])  # only rank 1 holds the NaN, in its slice of the first parameter
assert nonfinite.on_any_rank(fabric, bad).tolist() == [[True, False]], rank

combined = monitor.sharded_stats(fabric, parts, bins=8)
if rank == 0:
    whole = monitor.tensor_stats([first, second], 8, moments=True)
    columns = [0, 1, 4, *range(5, 13)]  # min, max, norm and the counts: the whole parameter's
    assert torch.allclose(combined[:, columns], whole[:, columns], atol=1e-5), (combined, whole)
    assert combined[0, 5:].sum() == 7 and combined[1, 5:].sum() == 3
print(f"combined on rank {{rank}}\\n", end="", flush=True)  # one write per rank: the two may interleave
fabric.barrier()
torch.distributed.destroy_process_group()  # left to the exit, gloo may abort when the other rank is already gone
"""


@pytest.mark.slow
def test_flags_and_histograms_of_parameter_slices_are_combined_over_ranks(tmp_path):
    script = tmp_path / "parts.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    result = run_script([str(script)], cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "combined on rank 0" in result.stdout and "combined on rank 1" in result.stdout
