"""Deduplication: identical positions merged per split, none shared between splits, big or small."""

import json

import numpy as np

from chessdata import dedup, prepare
from chessdata import folder as data
from chessdata.encoding import pack_fen

START = "rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w KQkq - 0 1"
E4 = "rnbqkbnr/pppppppp/8/8/4P3/8/PPPP1PPP/RNBQKBNR b KQkq e3 0 1"
E4_LATER_CLOCKS = "rnbqkbnr/pppppppp/8/8/4P3/8/PPPP1PPP/RNBQKBNR b KQkq e3 4 9"
D4 = "rnbqkbnr/pppppppp/8/8/3P4/8/PPP1PPPP/RNBQKBNR b KQkq d3 0 1"


def columns(*items):
    rows = np.stack([pack_fen(fen) for fen, _, _ in items]) if items else np.zeros((0, 101), np.uint8)
    return rows, np.array([cp for _, cp, _ in items], np.int32), np.array([m for _, _, m in items], np.int16)


def test_merge_means_and_counts_and_split_priority():
    out, merged, dropped = dedup.dedup_bucket(
        {
            "train": columns((START, 10, 0), (START, 30, 0), (E4_LATER_CLOCKS, 50, 0), (D4, 0, 2), (D4, 0, 3)),
            "val": columns((E4, 40, 0)),
            "test": columns(),
        }
    )
    train = {
        row.tobytes(): (cp, mate, n)
        for row, cp, mate, n in zip(
            out["train"]["positions"], out["train"]["cp"], out["train"]["mate"], out["train"]["count"]
        )
    }
    assert train[pack_fen(START).tobytes()] == (20, 0, 2)  # mean of 10 and 30, two copies
    assert train[pack_fen(D4).tobytes()] == (0, 2, 2)  # all mates: the first copy's mate
    assert len(train) == 2  # e4 (other clocks, same position) is in val, so not in train
    assert merged == {"test": 0, "val": 0, "train": 2} and dropped == {"test": 0, "val": 0, "train": 1}


def test_buckets_give_the_same_result_as_memory(prepared, tmp_path):
    import shutil

    for name, bucket_bytes in (("memory", 1e12), ("buckets", 1e5)):
        shutil.copytree(prepared, tmp_path / name)
        stats = dedup.deduplicate(tmp_path / name, max_bucket_bytes=bucket_bytes)
        assert (stats["buckets"] > 1) == (name == "buckets")
    sets = {}
    for name in ("memory", "buckets"):
        for split in data.SPLITS:
            arrays = data.load_split(tmp_path / name, split)
            sets[name, split] = {
                (r.tobytes(), int(c), int(m)) for r, c, m in zip(arrays["positions"], arrays["cp"], arrays["mate"])
            }
    for split in data.SPLITS:
        assert sets["memory", split] == sets["buckets", split]
    keys = {
        split: {key.tobytes() for key in dedup.keys(data.load_split(tmp_path / "buckets", split)["positions"])}
        for split in data.SPLITS
    }
    assert not keys["test"] & keys["train"] and not keys["test"] & keys["val"] and not keys["val"] & keys["train"]


def test_prepare_deduplicates_by_default(tmp_path):
    meta = prepare.prepare([data.SAMPLE_PGN], tmp_path / "d", max_games=400, workers=1)
    raw = prepare.prepare([data.SAMPLE_PGN], tmp_path / "r", prepare.Filters(dedup=False), max_games=400, workers=1)
    assert meta["duplicates"]["merged"]["train"] > 0 and raw["duplicates"] is None
    total = lambda m: sum(c["positions"] for c in m["splits"].values())  # noqa: E731
    merged = sum(meta["duplicates"]["merged"].values()) + sum(meta["duplicates"]["dropped_overlap"].values())
    assert total(meta) + merged == total(raw)
    counts = np.load(tmp_path / "d" / "train" / "count.npy")
    assert len(counts) == meta["splits"]["train"]["positions"] and counts.min() >= 1
    assert counts.sum() <= raw["splits"]["train"]["positions"] and counts.max() > 10  # openings repeat
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["duplicates"] == meta["duplicates"]
