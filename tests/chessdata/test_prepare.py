"""prepare at scale: worker-independent output, restart after a crash, filters, and fuzzed input."""

import random
import re
from pathlib import Path

import chess
import numpy as np
import pytest
import zstandard
from conftest import assert_same_output, python_process

from chessdata import folder as data
from chessdata import pgn, prepare
from chessdata.encoding import pack_board, row_to_fen

GAMES = list(pgn.iter_games(data.SAMPLE_PGN))[:400]


def write_zst(path: Path, games: list[str]) -> Path:
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(games).encode()))
    return path


def test_output_does_not_depend_on_workers(tmp_path):
    source = write_zst(tmp_path / "g.pgn.zst", GAMES)
    one = tmp_path / "one"
    two = tmp_path / "two"
    prepare.prepare([source], one, workers=1, games_per_chunk=50)
    meta = prepare.prepare([source], two, workers=2, games_per_chunk=50)
    assert meta["shards"] == 8 and meta["workers"] == 2
    assert_same_output(one, two)
    assert not (two / "shards").exists()


def test_restart_after_a_corrupt_tail_keeps_and_reuses_finished_shards(tmp_path):
    good = zstandard.ZstdCompressor().compress("".join(GAMES).encode())
    source = tmp_path / "g.pgn.zst"
    source.write_bytes(good + zstandard.ZstdCompressor().compress(b"x" * 1000)[:-6])  # a truncated last frame
    with pytest.raises(SystemExit, match=r"g\.pgn\.zst: truncated zstd archive.*7 shards before it are kept"):
        prepare.prepare([source], tmp_path / "out", workers=1, games_per_chunk=50)
    assert len(list((tmp_path / "out" / "shards").glob("[0-9]*.json"))) == 7  # the 8th chunk never completed
    assert not (tmp_path / "out" / "meta.json").exists()
    source.write_bytes(good)  # the download is repaired; the re-run picks up where it stopped
    meta = prepare.prepare([source], tmp_path / "out", workers=2, games_per_chunk=50)
    # the shards cut from bytes read before the damage are reused; those read together with it are redone
    assert 1 <= meta["shards_resumed"] <= 7
    prepare.prepare([source], tmp_path / "fresh", workers=1, games_per_chunk=50)
    assert_same_output(tmp_path / "out", tmp_path / "fresh")


def test_header_filters_are_counted(tmp_path):
    source = write_zst(tmp_path / "g.pgn.zst", GAMES)
    meta = prepare.prepare([source], tmp_path / "elo", prepare.Filters(min_elo=2100), workers=1)
    kept = sum(c["games"] for c in meta["splits"].values())
    assert meta["skipped"]["filtered_elo"] > 0 and kept + meta["skipped"]["filtered_elo"] == len(GAMES)
    meta = prepare.prepare([source], tmp_path / "tc", prepare.Filters(time_controls=("180+2",), min_ply=60), workers=1)
    assert "filtered_time_control" not in meta["skipped"] and meta["skipped"]["too_short"] > 0
    with pytest.raises(SystemExit, match="no position with an eval found"):
        prepare.prepare([source], tmp_path / "none", prepare.Filters(time_controls=("600+0",)), workers=1)


def mutate(game: str, rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:  # cut anywhere
        return game[: rng.randrange(len(game))]
    if kind == 1:  # a duplicated stretch
        a = rng.randrange(len(game))
        b = min(len(game), a + rng.randrange(1, 200))
        return game[:b] + game[a:b] + game[b:]
    if kind == 2:  # garbage bytes
        at = rng.randrange(len(game))
        return game[:at] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12))).decode("latin-1") + game[at:]
    if kind == 3:  # wrong move numbers
        return re.sub(r"\d+\.", lambda m: f"{rng.randrange(1, 300)}.", game)
    if kind == 4:  # two moves swapped
        tokens = game.split(" ")
        i, j = rng.randrange(len(tokens)), rng.randrange(len(tokens))
        tokens[i], tokens[j] = tokens[j], tokens[i]
        return " ".join(tokens)
    return game.replace("}", "", 1)  # a broken comment


def test_fuzzed_pgn_never_crashes_nor_yields_an_invalid_position(tmp_path):
    rng = random.Random(5)
    games = [mutate(g, rng) if rng.random() < 0.7 else g for g in GAMES[:300]]
    source = tmp_path / "fuzz.pgn"
    source.write_bytes("".join(games).encode("utf-8", errors="replace"))
    meta = prepare.prepare([source], tmp_path / "out", workers=1)
    # the damage was seen and counted by reason: games skipped, or kept up to a bad move
    assert sum(meta["skipped"].values()) + sum(meta["truncated"].values()) > 50
    assert "illegal_move" in meta["truncated"]
    checked = 0
    for split in data.SPLITS:
        for row in data.load_split(tmp_path / "out", split)["positions"]:
            board = chess.Board(row_to_fen(row))
            assert board.is_valid(), row_to_fen(row)
            assert np.array_equal(pack_board(board), row)
            checked += 1
    assert checked > 5000


@pytest.mark.slow  # starts processes of its own
def test_two_jobs_preparing_one_folder_at_once_take_turns(tmp_path):
    """As the first rank of two nodes on a shared filesystem: both ask for the same folder at the same
    moment; one prepares it, the other waits and finds it complete, and it equals a lone preparation."""
    import subprocess
    import sys

    from conftest import ROOT, child_env

    source, out, go = write_zst(tmp_path / "g.pgn.zst", GAMES), tmp_path / "shared", tmp_path / "go"
    job = (
        f"import sys, time, pathlib, chessdata.prepare as data; sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.005)\n"
        f"data.ensure_prepared([pathlib.Path({str(source)!r})], pathlib.Path({str(out)!r}))"
    )
    jobs = [
        python_process(
            [sys.executable, "-c", job],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for process in jobs:  # both imported and waiting: then they start together
        assert process.stdout.readline() == "ready\n", process.stderr.read()
    go.touch()
    results = [process.communicate(timeout=120) for process in jobs]
    assert [process.returncode for process in jobs] == [0, 0], results
    assert sum("prepared" in stdout for stdout, _ in results) == 1, results
    prepare.prepare([source], tmp_path / "alone")
    assert_same_output(out, tmp_path / "alone")
