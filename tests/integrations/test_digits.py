"""examples/digits.py, the common case: a per-example Dataset of dict examples with augmentation in 2 worker
processes, eval_step, no report of its own. It learns, and evaluates from another directory."""

import json

import pytest
from conftest import ROOT, run_script


@pytest.mark.slow  # two DataLoader worker processes
def test_the_digits_example_learns_and_evaluates(tmp_path):
    example = str(ROOT / "examples" / "digits.py")
    args = ["--out-dir", str(tmp_path), "--run-name", "d", "--train.max-steps", "300", "--log.logger", "csv"]
    result = run_script([example, *args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "d" / "test_metrics.json").read_text())
    assert metrics["test/acc"] > 0.9 and metrics["test/count"] == 180, metrics
    ckpt = str(tmp_path / "d" / "checkpoints" / "last.ckpt")
    evaluated = run_script(
        [str(ROOT / "train.py"), example, "evaluate", "--ckpt", ckpt, "--split", "val"], cwd=tmp_path
    )
    assert evaluated.returncode == 0 and "val metrics of" in evaluated.stdout, evaluated.stderr[-3000:]
