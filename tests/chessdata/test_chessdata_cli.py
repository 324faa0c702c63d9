"""`python -m chessdata prepare/dump/make-sample`: the command line of the chess data pipeline."""

import hashlib

import pytest
from conftest import SAMPLE, run_script


def digests(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.npy"))
    }


@pytest.mark.slow  # starts processes of its own
def test_prepare_and_dump_from_the_command_line(prepared, tmp_path):
    out = tmp_path / "cli"
    result = run_script(["-m", "chessdata", "prepare", str(SAMPLE), "--out", str(out), "--max-games", "300"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prepared" in result.stdout
    assert digests(out) == digests(prepared) and len(digests(out)) >= 9  # the same bytes as the library call
    result = run_script(["-m", "chessdata", "dump", str(out), "--split", "val", "--limit", "3"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(len(line.split("\t")) == 2 and line.count("/") == 7 for line in lines)
    bad = run_script(["-m", "chessdata", "dump", str(tmp_path), "--split", "val"])
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: ") and "Traceback" not in bad.stderr


def test_make_sample_is_a_subcommand():
    result = run_script(["-m", "chessdata", "make-sample", "--help"], env={"COLUMNS": "200"})
    assert result.returncode == 0 and "--games" in result.stdout and "--depth" in result.stdout
