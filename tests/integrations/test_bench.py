"""The benchmarks run (small sizes) and print their ratio tables; their numbers are not asserted."""

import subprocess
import sys

import pytest
from conftest import ROOT, child_env, run_script


@pytest.mark.slow
def test_data_benchmark_smoke():
    result = run_script(
        [
            "bench/data.py",
            "--mix-games",
            "400",
            "--naive-games",
            "20",
            "--games-per-chunk",
            "100",
            "--max-games",
            "400",
            "--loader-seconds",
            "0.3",
            "--memory-games",
            "800",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for line in (
        "naive python-chess loop",
        "prepare, 1 worker",
        "vs naive",
        "loader, batch 4096",
        "one lichess month on 16 cores",
        "peak memory of prepare",
        "800 analysed games, dedup",
    ):
        assert line in result.stdout


def test_histogram_benchmark_smoke():
    result = run_script(
        ["bench/histograms.py", "--rounds", "1", "--steps", "2", "--width", "32", "--depth", "1"], timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for arm in ("none", "kibitz", "tensorboard add_histogram", "wandb.watch", "one event: kibitz costs"):
        assert arm in result.stdout


@pytest.mark.slow
def test_overhead_benchmark_smoke_and_identical_weights():
    result = run_script(["bench/overhead.py", "--sizes", "tiny", "--rounds", "1", "--tiny-steps", "150"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for arm in ("raw", "fabric", "kibitz", "lightning", "ratios (time per step against the raw loop)"):
        assert arm in result.stdout
    # the hand-written loop and kibitz's loop end with bit-identical weights (fp32, same seed)
    assert "final weights, raw loop vs kibitz (tiny, fp32, seed 1337): identical" in result.stdout
    # host reads only around the logging steps (50, 100), none on the other steps
    line = next(line for line in result.stdout.splitlines() if line.startswith("  tiny kibitz: host reads"))
    steps = [int(n) for n in line.split("[")[1].rstrip("]").split(",")]
    assert steps and all(min(abs(n - 50), abs(n - 100)) <= 1 for n in steps), line
    assert "tiny raw: host reads between optimizer steps n and n+1 for n in none" in result.stdout


@pytest.mark.slow
def test_throughput_benchmark_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_script(["bench/throughput.py", "--smoke", "--out", str(out)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())["results"]
    assert {r["task"] for r in rows} == {"chess", "dvae"} and all("error" not in r for r in rows), rows
    assert all(r["samples_per_s"] > 0 for r in rows) and all(r["tokens_per_s"] > 0 for r in rows if r["task"] == "dvae")


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    """The one-command GPU check at CPU sizes: the bf16-mixed FSDP2 run resumed from its sharded checkpoint is
    the uninterrupted run bitwise, and every throughput cell has its numbers, in the JSON and the markdown."""
    import json

    out = tmp_path / "gpu_check.json"
    result = run_script(["bench/gpu_check.py", "--smoke", "--out", str(out)], timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["check"] for r in report["resume"]] == ["FSDP2, bf16-mixed, sharded"]
    assert report["resume"][0]["exact"], report["resume"]
    cells = report["throughput"]
    assert {c["task"] for c in cells} == {"chess", "dvae"} and all("samples_per_s" in c and "mfu" in c for c in cells)
    assert all("tokens_per_s" in c for c in cells if c["task"] == "dvae")
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| resume check |" in table and "exact (losses and weights bitwise)" in table
    assert table.count("| chess |") == 1 and table.count("| dvae |") == 1


def test_per_example_benchmark_smoke():
    result = run_script(["bench/per_example.py", "--workers", "0", "2", "--rounds", "1", "--examples", "1024"])
    assert result.returncode == 0, result.stderr[-3000:]
    for workers in ("0", "2"):
        assert f"{workers} workers  ratio kibitz / plain:" in result.stdout
        assert f"{workers} workers  kibitz" in result.stdout and f"{workers} workers  plain DataLoader" in result.stdout


def test_checkpoint_benchmark_smoke():
    result = run_script(["bench/checkpoints.py", "--rounds", "1", "--width", "32", "--depth", "2"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for arm in ("save: torch's dcp.save", "save: kibitz", "load: torch's dcp.load", "load: kibitz"):
        assert arm in result.stdout


@pytest.mark.slow
def test_startup_benchmark_smoke():
    # a started process, not a forked one: the fork server would fork the `python train.py --help` it times
    command = [sys.executable, "bench/startup.py", "--rounds", "1"]
    result = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for arm in ("import torch, lightning_fabric", "python train.py --help", "cli.parse (a run's flags)"):
        assert arm in result.stdout, arm


def test_engine_benchmark_smoke():
    result = run_script(["bench/engine.py", "--positions", "2", "--depth", "1"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for arm in ("material", "network", "ratio network / material nodes/s:", "time in the network:"):
        assert arm in result.stdout, arm


def test_engine_benchmark_names_a_checkpoint_it_cannot_read_in_one_line(tmp_path):
    result = run_script(["bench/engine.py", "--ckpt", str(tmp_path / "missing.ckpt")], timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(errors) == 1 and "missing.ckpt" in errors[0], result.stderr[-3000:]
