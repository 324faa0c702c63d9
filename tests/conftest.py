"""Shared fixtures: a small prepared dataset cut from the bundled sample, and random legal games."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import chess
import numpy as np
import pytest
import torch

from chessdata.cli import prepare
from chessdata.folder import SPLITS

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample.pgn.zst"

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the 2 CI cores: one thread each, as child_env gives
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """The first 300 games of the bundled sample, prepared (train/val/test)."""
    out = tmp_path_factory.mktemp("prepared")
    prepare([SAMPLE], out, max_games=300)
    return out


def random_games(count: int, seed: int, max_plies: int = 200):
    """Random legal games (promotions, castling, en passant, checks and mates all occur)."""
    rng = random.Random(seed)
    for _ in range(count):
        board = chess.Board()
        while not board.is_game_over() and board.ply() < max_plies:
            moves = list(board.legal_moves)
            # favour captures, promotions and castling so they turn up often
            special = [m for m in moves if m.promotion or board.is_castling(m) or board.is_en_passant(m)]
            board.push(rng.choice(special) if special and rng.random() < 0.5 else rng.choice(moves))
        yield board


def child_env(**extra: str) -> dict:
    """The environment for a training process the test starts: one thread (2-core CI), and its own wandb
    service. A child inherits WANDB_SERVICE once this process has used wandb and would share its service,
    where a killed child's run stays open and its resumed run cannot start ("run ID in use")."""
    # nor the rendezvous of a run this process made (its MASTER_PORT would be every child's, and two at once collide)
    left = {
        "WANDB_SERVICE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "MLFLOW_TRACKING_URI",
    }  # nor a tracking server a test read runs back from
    env = {k: v for k, v in os.environ.items() if k not in left}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONFAULTHANDLER": "1", **extra}


def python_process(args: list, **kwargs) -> subprocess.Popen:
    """`subprocess.Popen(args, **kwargs)`; for `python SCRIPT`, `python -m MODULE` and `python -c CODE` a process
    forked from a server that has imported torch and Fabric already (tests/forkserver.py): the same process, seconds
    sooner. A test of what a start imports or how long it takes uses subprocess itself."""
    import forkserver

    if isinstance(args, list) and args and is_console_script(args[0]):  # `fabric run`, `torchrun`, `wandb`: a script
        args = [sys.executable, *args]
    if not forkserver.can_fork(args, **kwargs):
        return subprocess.Popen(args, **kwargs)
    return forkserver.Forked(forkserver.address(child_env()), args, **kwargs)


def free_port() -> str:
    """A port no process listens on now: `fabric run`'s rendezvous defaults to 29400, and two launches at once (the
    suite's two workers) would collide there."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def is_console_script(program) -> bool:
    """Whether `program` is a console script of this environment's packages (its first line runs this Python), which
    this Python runs exactly as the kernel would through that line."""
    path = Path(str(program))
    if path.parent != Path(sys.executable).parent or path == Path(sys.executable) or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.readline().strip() == b"#!" + sys.executable.encode()


def run_python(args: list, timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(args, **kwargs)` through `python_process`. On a timeout a process in a group of its own (a
    forked one, or one started with start_new_session) has every process of the group (launched ranks too) dump its
    Python stacks, and the test fails with them, so a hang names the line it hangs on."""
    import signal

    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with python_process(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            if os.getpgid(process.pid) != process.pid:
                process.kill()
                raise
            os.killpg(process.pid, signal.SIGABRT)  # faulthandler prints every thread's stack
            stdout, stderr = process.communicate()
            raise AssertionError(f"timed out after {timeout} s: {args}\n{stdout[-3000:]}\n{stderr[-12000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_script(
    args: list[str], cwd: Path = ROOT, timeout: int = 300, env: dict | None = None, program: str = sys.executable
):
    """`python ARGS` (or PROGRAM ARGS) from the repository's root in a process group of its own, one thread per
    process on the 2-core CI; its output and errors as text."""
    return run_python(
        [program, *args],
        timeout=timeout,
        cwd=cwd,
        capture_output=True,
        text=True,
        env=child_env(**(env or {})),
        start_new_session=True,
    )


def parse_config(argv: list[str]):
    """The training config a command line gives (as train.py parses it)."""
    from kibitz import cli

    return cli.parse(argv)[2]


# ---------------------------------------------------------------- shared by the trainer's tests


def tiny_task_args(out: Path, *extra: str) -> list[str]:
    """The flags of a short run of tiny_task.TASK (in memory): train.main(tiny_task_args(...), task=TASK)."""
    common = ["--out-dir", str(out), "--train.max-steps", "12", "--train.val-every", "4", "--log.every", "4"]
    return [*common, "--log.no-progress-bar", "--log.no-pictures", *extra]


def tiny_args(prepared: Path, out: Path, *extra: str) -> list[str]:
    return [
        "chess",
        "--data.dir",
        str(prepared),
        "--data.sources",
        str(SAMPLE),
        "--model.width",
        "32",
        "--model.depth",
        "1",
        "--data.batch-size",
        "256",
        "--train.max-steps",
        "12",
        "--train.val-every",
        "4",
        "--schedule.warmup-steps",
        "2",
        "--log.every",
        "4",
        "--log.logger",
        "csv",
        "--log.no-progress-bar",
        "--log.no-pictures",  # drawing costs a short run more than its training; the tests of pictures ask for them
        "--out-dir",
        str(out),
        *extra,
    ]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_dir():  # a folder of shards: torch's converter writes it out whole
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(last, run_dir / "whole.pt")
        last = run_dir / "whole.pt"
    return torch.load(last, weights_only=True)["model"]


def train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"}


STEPS = 120  # long enough to be killed at a random step well inside the run


LONG = [
    "--model.width",
    "64",
    "--model.depth",
    "2",
    "--train.max-steps",
    str(STEPS),
    "--train.val-every",
    str(STEPS // 2),
    "--log.every",
    "1",
    "--checkpoint.every",
    "7",
    "--checkpoint.keep-best",
    "-1",
    "--data.batch-size",
    "512",
]  # 42 steps an epoch: kills cross epochs


def started(args: list[str]) -> subprocess.Popen:
    """`python ARGS` from the repository's root in its own process group (its launched ranks too), so a test can
    signal them all; its output and errors merged, as text, for the test to read as they come."""
    return python_process(
        [sys.executable, *args],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def start(prepared: Path, out: Path, name: str, *extra: str) -> subprocess.Popen:
    """A training run of LONG (see `started`)."""
    return started(["train.py", *tiny_args(prepared, out, *LONG, *extra, "--run-name", name)])


def two_processes(strategy: str) -> list[str]:
    return ["--fabric.accelerator", "cpu", "--fabric.devices", "2", "--fabric.strategy", strategy]


@pytest.fixture(scope="session")
def reference(prepared, tmp_path_factory):
    """The uninterrupted run of LONG with the given launch flags, run once per session (in this process where it is
    one process: a fresh one would spend seconds on imports): every test that interrupts and resumes a run with those
    flags compares against the same one. Under pytest-xdist the workers share it through their common temporary
    folder, one computing it while the others wait on its lock."""
    import fcntl
    import os

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # popen-gwN/: the folder above is this session's, shared
        shared = shared.parent

    def uninterrupted(*flags: str) -> Path:
        out = shared / ("reference" + "".join(flags).replace("--", "-").replace(".", "_"))
        with open(out.with_name(out.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "done").exists():
                run_train(tiny_args(prepared, out, *LONG, *flags, "--run-name", "reference"))
                (out / "done").touch()
        return out / "reference"

    return uninterrupted


def resume_and_compare(prepared: Path, out: Path, name: str, reference_dir: Path, *extra: str) -> None:
    """Resume `name` with `--resume auto` in fresh processes and require the reference's per-step losses
    (every step once) and bitwise its final weights."""
    run_train(tiny_args(prepared, out, *LONG, *extra, "--run-name", name, "--resume", "auto"))
    assert_matches_reference(out / name, reference_dir)


def run_train(args: list[str]) -> None:
    """`python train.py ARGS` to exit 0: in this process when it is one process, else in fresh ones."""
    if "--fabric.devices" in args and args[args.index("--fabric.devices") + 1] != "1":
        result = run_script(["train.py", *args])
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        import train

        assert train.main(args) == 0


def steps_so_far(run_dir: Path) -> int:
    """How many training losses the run has logged: a count, not a parse (a test polls it while the run trains, and
    parsing the growing CSV many times a second took CPU from the run on a 2-core machine)."""
    try:
        return (run_dir / "metrics.csv").read_text(errors="replace").count(",train/loss,")
    except FileNotFoundError:
        return 0


def wait_for_steps(run_dir: Path, steps: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if steps_so_far(run_dir) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach {steps} steps: {process.poll()}")


def assert_matches_reference(run_dir: Path, reference_dir: Path) -> None:
    reference, resumed = train_losses(reference_dir), train_losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # every step once: nothing missing, nothing twice
    assert resumed == reference  # the same losses, bitwise
    final, expected = weights(run_dir), weights(reference_dir)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def assert_same_as_uninterrupted(prepared: Path, out: Path, name: str) -> None:
    import train

    assert train.main(tiny_args(prepared, out, *LONG, "--run-name", "reference")) == 0
    assert_matches_reference(out / name, out / "reference")


ITEMS_TASK = str(ROOT / "tests" / "items_task.py")


DDP = ["--fabric.accelerator", "cpu", "--fabric.devices", "2", "--fabric.strategy", "ddp"]


def kill_at_a_random_step(out: Path, name: str, *flags: str, task: str = ITEMS_TASK) -> int:
    process = python_process(
        [sys.executable, task, "--out-dir", str(out), "--run-name", name, *flags],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    target, deadline = random.randint(8, 32), time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if steps_so_far(out / name) >= target:
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before step {target}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return target


def dvae_args(prepared, out, *extra):
    from conftest import SAMPLE

    return [
        "dvae",
        "--data.dir",
        str(prepared),
        "--data.sources",
        str(SAMPLE),
        "--model.latents",
        "8",
        "--model.codebook",
        "16",
        "--model.width",
        "16",
        "--model.depth",
        "1",
        "--data.batch-size",
        "64",
        "--train.max-steps",
        "40",
        "--train.val-every",
        "20",
        "--schedule.warmup-steps",
        "5",
        "--log.every",
        "10",
        "--schedule.noam-d-model",
        "16",
        "--log.logger",
        "csv",
        "--log.no-progress-bar",
        "--log.no-pictures",
        "--out-dir",
        str(out),
        "--dvae.kl-weight.end",
        "0.5",
        "--dvae.kl-weight.steps",
        "30",
        "--dvae.tau.steps",
        "30",
        "--dvae.mask.start",
        "0.3",
        *extra,
    ]


def arrays(directory: Path) -> dict:
    return {
        (split, name): np.load(directory / split / f"{name}.npy")
        for split in SPLITS
        for name in ("positions", "cp", "mate")
    }


def assert_same_output(a: Path, b: Path) -> None:
    left, right = arrays(a), arrays(b)
    assert all(np.array_equal(left[key], right[key]) for key in left)
    meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (a, b))
    assert meta_a["splits"] == meta_b["splits"] and meta_a["skipped"] == meta_b["skipped"]


def sample_games(count: int = 400) -> list[str]:
    """The first games of the bundled sample, as PGN text."""
    from chessdata import pgn
    from chessdata.folder import SAMPLE_PGN

    return list(pgn.iter_games(SAMPLE_PGN))[:count]


# ---------------------------------------------------------------- crafted files (test_safety, test_crafted_files)

FEN = "rnbqkbnr/pppppppp/8/8/4P3/8/PPPP1PPP/RNBQKBNR b KQkq e3 0 1"


class Plant:
    """Unpickling this creates `path`: what an attacker's checkpoint would do (and worse)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    """A short chess run (a module's own) whose checkpoints the crafted files are made from."""
    import train

    out = tmp_path_factory.mktemp("runs")
    assert (
        train.main(tiny_args(prepared, out, "--run-name", "t", "--train.max-steps", "8", "--train.val-every", "4")) == 0
    )
    return out / "t"


def as_folder(state: dict, folder: Path) -> Path:
    """A checkpoint file's state as a folder of shards, laid out as Fabric's sharded save lays it out."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": dict(state["model"])}, checkpoint_id=folder)
    torch.save({k: v for k, v in state.items() if k not in ("model", "optimizer")}, folder / "meta.pt")
    return folder


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]
