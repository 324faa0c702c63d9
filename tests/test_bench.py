"""The benchmarks run (small sizes) and print their ratio tables; their numbers are not asserted."""

from conftest import run_script


def test_data_benchmark_smoke():
    result = run_script(["bench/data.py", "--mix-games", "400", "--naive-games", "20", "--games-per-chunk", "100"],
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("naive python-chess loop", "prepare, 1 worker", "vs naive", "loader, batch 4096",
                 "one lichess month on 16 cores"):
        assert line in result.stdout


def test_histogram_benchmark_smoke():
    result = run_script(["bench/histograms.py", "--rounds", "1", "--steps", "2", "--width", "32", "--depth", "1"],
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for arm in ("none", "kibitz", "tensorboard add_histogram", "wandb.watch", "one event: kibitz costs"):
        assert arm in result.stdout
