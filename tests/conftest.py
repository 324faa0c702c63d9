"""Shared fixtures: a small prepared dataset cut from the bundled sample, and random legal games."""

import os
import random
import subprocess
import sys
from pathlib import Path

import chess
import pytest
import torch

from chessdata.cli import prepare

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
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONFAULTHANDLER": "1", **extra}


def run_script(
    args: list[str], cwd: Path = ROOT, timeout: int = 300, env: dict | None = None, program: str = sys.executable
):
    """Run a repository script in a fresh process (one thread per process on the 2-core CI). On a
    timeout every process of the run (launched ranks too) dumps its Python stacks before the test
    fails with them, so a hang names the line it hangs on."""
    import signal

    process = subprocess.Popen(
        [program, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(**(env or {})),
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)  # faulthandler prints every thread's stack
        stdout, stderr = process.communicate()
        raise AssertionError(f"timed out after {timeout} s: {args}\n{stdout[-3000:]}\n{stderr[-12000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def parse_config(argv: list[str]):
    """The training config a command line gives (as train.py parses it)."""
    import cli

    return cli.parse(argv)[2]
