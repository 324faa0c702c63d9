"""Checkpoints are data, names stay inside --out-dir, one writer per run folder, Ctrl-C saves like SIGTERM.

A crafted checkpoint here is a real kibitz checkpoint with one pickled object planted in it whose unpickling would
create a file (`marker`): every command that reads checkpoints must refuse it in one line and create nothing."""

import pickle
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    FEN,
    LONG,
    ROOT,
    STEPS,
    Plant,
    as_folder,
    assert_same_as_uninterrupted,
    child_env,
    one_line,
    python_process,
    run_script,
    start,
    started,
    tiny_args,
    tiny_task_args,
    wait_for_steps,
)
from tiny_task import TASK as TINY

import train
from kibitz import storage
from tasks import predict


@pytest.fixture
def crafted(trained, tmp_path):
    """(marker, {kind: crafted checkpoint}): a file, a folder whose .metadata is planted, one whose meta.pt is."""
    marker = tmp_path / "code-ran"
    state = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    file = tmp_path / "crafted.ckpt"
    torch.save({**state, "progress": Plant(marker)}, file)
    metadata = as_folder(state, tmp_path / "metadata.ckpt")
    real = storage.dcp_metadata(metadata)
    real.storage_meta = Plant(marker)
    (metadata / ".metadata").write_bytes(pickle.dumps(real))
    meta = as_folder(state, tmp_path / "meta.ckpt")
    torch.save({**torch.load(meta / "meta.pt", weights_only=True), "rng": Plant(marker)}, meta / "meta.pt")
    # the plants are live: torch's unrestricted loaders would run them
    pickle.loads((metadata / ".metadata").read_bytes())
    assert marker.exists()
    marker.unlink()
    return marker, {"file": file, "metadata": metadata, "meta.pt": meta}


@pytest.mark.parametrize("kind", ["file", "metadata", "meta.pt"])
def test_a_crafted_checkpoint_runs_nothing_in_any_command(prepared, tmp_path, capsys, crafted, kind):
    marker, paths = crafted
    ckpt = str(paths[kind])
    commands = [
        ["evaluate", "--ckpt", ckpt],
        ["chess", "evaluate", "--ckpt", ckpt],
        tiny_args(prepared, tmp_path / "out", "--init-from", ckpt),
        tiny_args(prepared, tmp_path / "out", "--resume", ckpt),
        tiny_args(prepared, tmp_path / "out", "--run-name", "r", "--resume", ckpt),
    ]
    if kind != "file":
        commands.append(["export-checkpoint", "--ckpt", ckpt, "--out", str(tmp_path / "exported.ckpt")])
    else:  # an artifact folder, as `wandb artifact get` leaves it
        (tmp_path / "artifact").mkdir()
        (tmp_path / "artifact" / "model.ckpt").write_bytes(paths["file"].read_bytes())
        artifact = str(tmp_path / "artifact")
        commands += [["evaluate", "--ckpt", artifact], tiny_args(prepared, tmp_path / "out", "--resume", artifact)]
        commands.append(tiny_args(prepared, tmp_path / "out", "--init-from", artifact))
    for argv in commands:
        assert train.main(argv) == 2, argv
        line = one_line(capsys)
        assert "nothing of it was run" in line or "refused" in line, (argv, line)
        assert not marker.exists(), argv
    assert predict.main(["--ckpt", ckpt, FEN]) == 2
    assert "refused" in one_line(capsys) and not marker.exists()
    assert not (tmp_path / "exported.ckpt").exists()


def test_resume_auto_passes_over_a_planted_last_checkpoint(prepared, tmp_path, capsys, crafted):
    marker, paths = crafted
    args = tiny_args(prepared, tmp_path, "--checkpoint.keep-best", "-1", "--run-name", "p", "--train.max-steps", "8")
    assert train.main([*args, "--train.val-every", "4"]) == 0
    last = tmp_path / "p" / "checkpoints" / "last.ckpt"
    last.unlink()
    last.write_bytes(paths["file"].read_bytes())  # someone planted it in the run folder
    capsys.readouterr()
    assert train.main([*args[:-2], "--train.max-steps", "12", "--train.val-every", "4", "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {last}: cannot load checkpoint (UnsafeCheckpoint: holds Python objects" in out
    assert "resumed from" in out and "step-00000008.ckpt at step 8" in out and not marker.exists()


def test_a_damaged_folder_of_shards_is_one_line_everywhere(prepared, trained, tmp_path, capsys):
    folder = as_folder(torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True), tmp_path / "cut.ckpt")
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # no checksums.json to tell: torch finds out as it reads
    commands = [
        ["evaluate", "--ckpt", str(folder)],
        ["export-checkpoint", "--ckpt", str(folder), "--out", str(tmp_path / "one.ckpt")],
        tiny_args(prepared, tmp_path, "--run-name", "i", "--init-from", str(folder)),
        tiny_args(prepared, tmp_path, "--run-name", "r", "--resume", str(folder)),
    ]
    for argv in commands:
        assert train.main(argv) == 2, argv
        line = one_line(capsys)
        assert "cannot" in line and ("cut short" in line or "corrupted" in line), (argv, line)


def old_format(state: dict) -> dict:
    """What the previous kibitz wrote: RNG states as random's tuple and numpy's array (refused by the safe loader)."""
    import numpy as np

    for rank in state["rng"]:
        version, words, gauss = rank["python"]
        rank["python"] = (version, tuple(words), gauss)
        kind, keys, position, has_gauss, cached = rank["numpy"]
        rank["numpy"] = (kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached)
    return state


def test_old_checkpoints_convert_only_with_trust(prepared, trained, tmp_path, capsys):
    last = trained / "checkpoints" / "last.ckpt"
    old = tmp_path / "old.ckpt"
    torch.save(old_format(torch.load(last, weights_only=True)), old)
    old_folder = as_folder(old_format(torch.load(last, weights_only=True)), tmp_path / "old-folder.ckpt")
    for source in (old, old_folder):
        assert train.main(["evaluate", "--ckpt", str(source)]) == 2
        assert "convert-checkpoint --trust" in one_line(capsys)
        new = tmp_path / f"new-{source.name}"
        assert train.main(["convert-checkpoint", "--ckpt", str(source), "--out", str(new)]) == 2
        assert "runs any code it holds" in one_line(capsys) and not new.exists()
        assert train.main(["convert-checkpoint", "--ckpt", str(source), "--out", str(new), "--trust"]) == 0
        assert train.main(["evaluate", "--ckpt", str(new)]) == 0
    converted = torch.load(tmp_path / "new-old.ckpt", weights_only=True)
    original = torch.load(last, weights_only=True)
    for new, before in zip(converted["rng"], original["rng"]):
        assert new["python"] == before["python"] and new["numpy"] == before["numpy"]
        assert torch.equal(new["torch"], before["torch"])
    assert converted["progress"]["step"] == original["progress"]["step"]
    assert all(torch.equal(converted["model"][k], v) for k, v in original["model"].items())
    resumed = tiny_args(prepared, tmp_path, "--run-name", "c", "--train.max-steps", "12", "--resume")
    assert train.main([*resumed, str(tmp_path / "new-old.ckpt")]) == 0


def test_names_from_a_flag_or_a_checkpoint_stay_inside_out_dir(prepared, trained, tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    assert train.main(tiny_args(prepared, out, "--run-name", "../../escaped")) == 2
    assert one_line(capsys).startswith("error: run_name: expected one plain folder name")
    state = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    state["run"]["name"] = "../../escaped"
    loose = tmp_path / "loose.ckpt"
    torch.save(state, loose)
    assert train.main(tiny_args(prepared, out, "--resume", str(loose))) == 2
    assert "records the run name '../../escaped'" in one_line(capsys)
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.glob("deep/*/checkpoints"))


def test_a_checkpoint_never_runs_the_task_file_it_names(trained, tmp_path, capsys):
    marker = tmp_path / "task-ran"
    task_file = tmp_path / "evil_task.py"
    task_file.write_text(f"open({str(marker)!r}, 'w')\n")
    state = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    state["config"]["task"], state["task"] = "evil", {"name": "evil", "file": str(task_file)}
    torch.save(state, tmp_path / "evil.ckpt")
    assert train.main(["evaluate", "--ckpt", str(tmp_path / "evil.ckpt")]) == 2
    line = one_line(capsys)
    assert "only when you name it" in line and shlex.quote(str(task_file)) in line and not marker.exists()


@pytest.mark.slow  # starts processes of its own
def test_one_writer_per_run_folder(tmp_path, capsys):
    folder = tmp_path / "busy"
    hold = f"import time, pathlib; from kibitz import runs; held = runs.lock_folder(pathlib.Path({str(folder)!r}))"
    holder = python_process(
        [sys.executable, "-c", hold + "; print('held', flush=True); time.sleep(120)"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train.main(tiny_task_args(tmp_path, "--run-name", "busy"), task=TINY) == 2
        line = one_line(capsys)
        assert f"{folder} is in use by process {holder.pid}" in line and "another --run-name" in line
        assert not (folder / "metrics.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (
        train.main(tiny_task_args(tmp_path, "--run-name", "busy"), task=TINY) == 0
    )  # the dead holder's lock is taken over
    assert f"taking over {folder}: its previous run (process {holder.pid}" in capsys.readouterr().out
    assert (folder / ".lock").read_text() == ""  # released at the end


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    from kibitz.runs import new_run_dir

    first, second = new_run_dir(tmp_path, "lr-find-x"), new_run_dir(tmp_path, "lr-find-x")
    assert first.name == "lr-find-x" and second.name == "lr-find-x-2"


@pytest.mark.slow
def test_ctrl_c_saves_and_the_printed_command_resumes_the_run_as_configured(prepared, tmp_path):
    out = tmp_path / "my runs"  # a space: the printed command must be quoted
    process = start(prepared, out, "ctrlc")
    wait_for_steps(out / "ctrlc", 20, process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in output, output[-2000:]
    assert "SIGINT received" in output
    command = shlex.split(output.split("resume with: ")[1].splitlines()[0])
    # the run's flags (a model width of 64, say) come from its config.json: without them nothing would load
    assert command[:3] == ["python", "train.py", "chess"] and "--model.width" not in command
    resumed = run_script(command[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stopped = torch.load(out / "ctrlc" / "checkpoints" / f"step-{STEPS:08d}.ckpt", weights_only=True)
    assert stopped["progress"]["step"] == STEPS
    assert_same_as_uninterrupted(prepared, out, "ctrlc")


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(prepared, tmp_path):
    process = start(prepared, tmp_path, "twice", "--log.every", "1000", "--train.max-steps", "100000")
    for line in process.stdout:
        if line.startswith("run folder:"):
            break
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT and "SIGINT again: exiting at once" in output, output[-2000:]
    assert "Traceback" not in output


assert LONG  # the interrupted runs above are test_resume's LONG runs, compared with its uninterrupted one


@pytest.mark.slow
def test_an_interrupt_to_the_process_that_forked_the_ranks_reaches_every_rank(tmp_path):
    """A notebook's interrupt reaches its kernel only, which forked the ranks (ddp_notebook, ddp_fork): it passes the
    signal on; every rank saves and stops, the caller returns as from a script's Ctrl-C, and no process is left."""
    args = ["--out-dir", str(tmp_path), "--run-name", "f", "--fabric.strategy", "ddp_fork", "--fabric.devices", "2"]
    args += ["--fabric.accelerator", "cpu", "--train.max-steps", "100000", "--log.every", "20"]
    process = started(["train.py", str(ROOT / "tests" / "tiny_task.py"), *args])
    for line in process.stdout:
        if line.startswith("run folder:"):
            break
    # at once: rank 1 may still be setting up, before its own handlers (the signal must wait for them, not be lost)
    process.send_signal(signal.SIGINT)  # to the forking process alone, as Jupyter interrupts its kernel
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and output.count("SIGINT received") == 1, output[-3000:]
    assert "stopped at step" in output and "--resume auto" in output and "Traceback" not in output
    step = torch.load(tmp_path / "f" / "checkpoints" / "last.ckpt", weights_only=True)["progress"]["step"]
    assert step > 0 and step % 20 == 0  # saved at a log interval, by every rank together
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout == b""  # no rank left


RANK_1_FAILS = """
import sys

sys.path.insert(0, {tests!r})
import torch.distributed as dist
from tiny_task import mistaken, train_step


def fails_on_rank_1(cfg, model, batch, step, train_size):
    if step == 5 and dist.get_rank() == 1:
        raise ValueError("a mistake on rank 1")
    return train_step(cfg, model, batch, step, train_size)


TASK = mistaken(train_step=fails_on_rank_1)
"""


@pytest.mark.slow
def test_a_task_raising_on_a_forked_rank_is_one_line(tmp_path):
    """ddp_fork (ddp_notebook outside a kernel): rank 1's train_step raises; the caller ends with that rank's one
    line, once, not its traceback, nor torch's notice that it ended rank 0, nor rank 0's SIGTERM line."""
    (tmp_path / "rank1_task.py").write_text(RANK_1_FAILS.format(tests=str(ROOT / "tests")))
    args = ["--out-dir", str(tmp_path), "--run-name", "f", "--fabric.strategy", "ddp_fork", "--fabric.devices", "2"]
    args += ["--fabric.accelerator", "cpu", "--train.max-steps", "12"]
    result = run_script(["train.py", str(tmp_path / "rank1_task.py"), *args])
    errors = [line for line in result.stderr.splitlines() if not line.startswith(("[rank", "Initializing", "All "))]
    errors = [line for line in errors if line.strip() and not line.startswith(("---", "distributed_backend"))]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: task tiny: train_step raised ValueError at step 6 (rank1_task.py line 11)")
    assert "a mistake on rank 1; its checkpoints are kept" in errors[0] and "SIGTERM" not in result.stdout
    assert (tmp_path / "f" / "checkpoints" / "step-00000004.ckpt").exists()


def test_an_out_dir_that_is_a_file_is_said_of_out_dir(tmp_path, capsys):
    """Not of --run-name, which has nothing to do with it."""
    (tmp_path / "a_file").write_text("not a folder")
    out = ["--out-dir", str(tmp_path / "a_file")]
    for given in ([], ["--run-name", "r"], ["--resume", "auto"]):
        assert train.main([*out, *given], task=TINY) == 2
        line = one_line(capsys)
        assert line.startswith("error: out_dir: cannot ") and str(tmp_path / "a_file") in line, line
