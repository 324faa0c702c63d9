"""prepare under faults: restarts with other inputs or settings, a kill during the final cleanup, a dead worker,
two preparations of one folder, and the trainer pointed at a folder of other data. Nothing lost, nothing stale."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard
from conftest import ROOT, assert_same_output, child_env, python_process, run_script, sample_games

from chessdata import folder, prepare


def write(path: Path, games: list[str], damaged_tail: bool = False) -> Path:
    payload = zstandard.ZstdCompressor().compress("".join(games).encode())
    if damaged_tail:  # a download cut short: the run stops there, keeping its finished shards
        payload += zstandard.ZstdCompressor().compress(b"x" * 1000)[:-6]
    path.write_bytes(payload)
    return path


def interrupted(source: Path, games: list[str], out: Path, **settings) -> None:
    write(source, games, damaged_tail=True)
    with pytest.raises(SystemExit, match="shards before it are kept"):
        prepare.prepare([source], out, workers=1, **settings)
    assert list((out / "shards").glob("[0-9]*.json"))


def folder_bytes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("change", ["source", "chunking", "filter"])
def test_a_restart_with_other_input_or_settings_equals_a_fresh_run(tmp_path, change):
    source = tmp_path / "g.pgn.zst"
    interrupted(source, sample_games()[:300], tmp_path / "out", games_per_chunk=50)
    settings: dict = {"games_per_chunk": 50}
    games = sample_games()[:300]
    if change == "source":
        games = sample_games()[100:400]  # another file under the same name
    elif change == "chunking":
        settings["games_per_chunk"] = 70
    else:
        settings["filters"] = prepare.Filters(min_elo=2000)
    write(source, games)
    meta = prepare.prepare([source], tmp_path / "out", workers=1, **settings)
    prepare.prepare([source], tmp_path / "fresh", workers=1, **settings)
    assert_same_output(tmp_path / "out", tmp_path / "fresh")
    # other settings: another recipe, nothing reused; another file: no shard's input bytes match
    assert meta["shards_resumed"] == 0


def test_a_kill_during_the_final_cleanup_leaves_a_usable_folder_and_reruns_cleanly(tmp_path):
    source = write(tmp_path / "g.pgn.zst", sample_games()[:200])
    out = tmp_path / "out"
    # kill the process while it deletes the shards: after a few files are gone
    script = (
        "import os, sys, shutil, pathlib\n"
        "from chessdata import prepare\n"
        "rmtree = shutil.rmtree\n"
        "def dying_rmtree(path, *a, **k):\n"
        "    if '.shards-done' not in str(path): return rmtree(path, *a, **k)\n"
        "    files = sorted(pathlib.Path(path).iterdir())\n"
        "    for f in files[: len(files) // 2]: f.unlink()\n"
        "    os.kill(os.getpid(), 9)\n"
        "prepare.shutil.rmtree = dying_rmtree\n"
        f"prepare.prepare([pathlib.Path({str(source)!r})], pathlib.Path({str(out)!r}), workers=1, games_per_chunk=20)\n"
    )
    result = run_script(["-c", script])
    assert result.returncode == -9
    assert len(folder.load_split(out, "train")["cp"]) > 0  # meta.json was written before the cleanup
    meta = prepare.prepare([source], out, workers=1, games_per_chunk=20)
    assert not list(out.glob(".shards-done-*")) and not (out / "shards").exists()
    prepare.prepare([source], tmp_path / "fresh", workers=1, games_per_chunk=20)
    assert_same_output(out, tmp_path / "fresh")
    assert meta["shards"] == 10


@pytest.mark.slow
def test_a_dead_worker_stops_prepare_with_one_line(tmp_path):
    source = write(tmp_path / "g.pgn.zst", sample_games() * 6)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "chessdata", "prepare", str(source), "--out", str(out), "--workers", "2"]
    process = python_process(
        [*command, "--games-per-chunk", "20"], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    children: list[int] = []
    deadline = time.monotonic() + 60
    while not children and time.monotonic() < deadline:  # the workers start with the first chunk
        time.sleep(0.1)
        tasks = Path(f"/proc/{process.pid}/task").glob("*/children")  # any thread may have started them
        children = [int(pid) for task in tasks for pid in task.read_text().split()]
    assert children, "no worker seen"
    os.kill(children[0], signal.SIGKILL)  # what the OOM killer does
    started = time.monotonic()
    stdout, stderr = process.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert process.returncode == 2 and "Traceback" not in stderr.decode(), stderr.decode()[-2000:]
    lines = [line for line in stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "worker died" in lines[0] and "chunk" in lines[0], lines


@pytest.mark.slow  # starts processes of its own
def test_two_prepares_of_one_folder_take_turns(tmp_path):
    source = write(tmp_path / "g.pgn.zst", sample_games()[:300])
    out = tmp_path / "shared"
    command = [sys.executable, "-m", "chessdata", "prepare", str(source), "--out", str(out), "--workers", "1"]
    jobs = [python_process(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    jobs.append(python_process(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = [job.communicate(timeout=120) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], results
    prepare.prepare([source], tmp_path / "alone", workers=1)
    assert_same_output(out, tmp_path / "alone")


def test_the_trainer_never_overwrites_a_folder_of_other_data(tmp_path):
    """`--data.dir DIR` without the sources DIR was made from: refused in one line, DIR byte-identical."""
    source = write(tmp_path / "mine.pgn.zst", sample_games()[:120])
    mine = tmp_path / "mine"
    prepare.prepare([source], mine, workers=1)
    before = folder_bytes(mine)
    result = run_script(
        ["train.py", "chess", "--data.dir", str(mine), "--train.max-steps", "1", "--schedule.warmup-steps", "0"],
        timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "holds positions prepared from" in line and "mine.pgn.zst" in line and "nothing was changed" in line
    assert folder_bytes(mine) == before
    meta = json.loads((mine / "meta.json").read_text())
    assert meta["fingerprints"][0]["path"] == str(source)


def test_the_same_files_by_another_path_are_the_same_sources(tmp_path, monkeypatch):
    """A folder prepared from `data/x.pgn.zst` in one working directory is used, untouched, when another job
    names the same file by its absolute path (or through a link); a file with other bytes is still refused."""
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "x.pgn.zst", sample_games()[:60])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "prepared"
    prepare.ensure_prepared([Path("data/x.pgn.zst")], out)
    before = folder_bytes(out)
    (tmp_path / "link.pgn.zst").symlink_to(tmp_path / "data" / "x.pgn.zst")
    monkeypatch.chdir(ROOT)
    for name in (tmp_path / "data" / "x.pgn.zst", tmp_path / "link.pgn.zst"):
        assert prepare.ensure_prepared([name], out)["sources"] == ["data/x.pgn.zst"]
    assert folder_bytes(out) == before
    other = write(tmp_path / "other.pgn.zst", sample_games()[60:120])
    with pytest.raises(SystemExit, match="holds positions prepared from data/x.pgn.zst"):
        prepare.ensure_prepared([other], out)
    assert folder_bytes(out) == before


def test_missing_sources_are_one_line_and_a_prepared_folder_outlives_them(tmp_path, monkeypatch):
    """The defaults from another working directory name no file: one line naming the field and the directory
    (was a traceback). A folder whose sources were deleted after preparing is used as it is."""
    result = run_script(
        [str(ROOT / "train.py"), "chess", "--train.max-steps", "1", "--schedule.warmup-steps", "0"],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "data/sample.pgn.zst: no such file" in line and f"working directory {tmp_path}" in line
    source = write(tmp_path / "gone.pgn.zst", sample_games()[:60])
    out = tmp_path / "prepared"
    prepare.ensure_prepared([source], out)
    before = folder_bytes(out)
    source.unlink()
    assert prepare.ensure_prepared([source], out)["sources"] == [str(source)]
    assert folder_bytes(out) == before
    with pytest.raises(SystemExit, match="other.pgn.zst: no such file"):
        prepare.ensure_prepared([tmp_path / "other.pgn.zst"], out)
