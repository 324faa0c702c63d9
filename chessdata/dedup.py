"""Deduplicate prepared positions: each position once per split, and never in two splits.

Opening positions repeat thousands of times. Within a split, identical positions are merged into
one row whose eval is the mean of the non-mate evals (a mate is kept only if every copy is one) and
whose `count.npy` entry says how many were merged. Then a position that is in test is removed from
val and train, and one in val from train, so no test position is ever trained on.

"Identical" means the board, castling rights, side to move and en-passant square: the position a
FEN's first four fields describe as python-chess writes them (en passant only where a capture is legal); the
move clocks do not count (the first copy's row is kept).
Data larger than memory is hash-partitioned into buckets first, each deduplicated on its own.
"""

import math
import os
import shutil
from pathlib import Path

import chess
import numpy as np

from chessdata.encoding import FLAG_BLACK_TO_MOVE, FLAG_EN_PASSANT, ROW_BYTES, row_to_fen
from chessdata.folder import COLUMNS, SPLITS, npy_blocks, write_npy_header

KEY_COLUMNS = np.r_[0:96, 99:101]  # the bitboards, en passant and flags: not the clocks (96..98)
_MIX = np.array([0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93] * 4, dtype=np.uint64)[
    :13
]


def key_bytes(positions: np.ndarray) -> np.ndarray:
    """The bytes that identify each row's position: bitboards, en passant and flags, with the en-passant square
    only where a capture is legal (python-chess's FEN), since games set it after every double push and the eval
    database only where it matters: the same position from either is one key."""
    key = np.concatenate([positions[:, :96], positions[:, 99:101]], axis=1)  # KEY_COLUMNS, a contiguous copy
    rows = np.flatnonzero(positions[:, 100] & FLAG_EN_PASSANT)
    if len(rows):
        legal = np.zeros(len(rows), dtype=bool)
        maybe = np.flatnonzero(_pawn_beside(positions[rows]))  # a capturer stands there: python-chess decides
        if len(maybe):  # once per distinct position (openings repeat)
            distinct, inverse = np.unique(positions[rows[maybe]], axis=0, return_inverse=True)
            verdict = np.array([chess.Board(row_to_fen(row)).has_legal_en_passant() for row in distinct])
            legal[maybe] = verdict[inverse.ravel()]
        cleared = rows[~legal]
        key[cleared, -2] = 0xFF
        key[cleared, -1] &= ~FLAG_EN_PASSANT & 0xFF
    return key


def _pawn_beside(rows: np.ndarray) -> np.ndarray:
    """Per row: does a pawn of the side to move stand where it could take on the en-passant square?"""
    ep = rows[:, 99].astype(np.int64)
    black = (rows[:, 100] & FLAG_BLACK_TO_MOVE) != 0
    plane = np.where(black, 11, 5)  # the mover's pawns: BP or WP
    found = np.zeros(len(rows), dtype=bool)
    for white_step, black_step, side_ok in ((-9, 7, ep % 8 > 0), (-7, 9, ep % 8 < 7)):
        square = ep + np.where(black, black_step, white_step)
        inside = side_ok & (ep < 64) & (square >= 0) & (square < 64)
        square = np.clip(square, 0, 63)
        byte = rows[np.arange(len(rows)), 8 * plane + square // 8]
        found |= inside & ((byte >> (7 - square % 8)) & 1).astype(bool)
    return found


def keys(positions: np.ndarray) -> np.ndarray:
    """One opaque (void) value per row, comparable and sortable by numpy."""
    key = key_bytes(positions)
    return key.view(np.dtype((np.void, key.shape[1]))).ravel()


def bucket_of(positions: np.ndarray, buckets: int) -> np.ndarray:
    padded = np.zeros((len(positions), 104), dtype=np.uint8)
    padded[:, : len(KEY_COLUMNS)] = key_bytes(positions)
    with np.errstate(over="ignore"):  # wrapping multiplication is the point of the hash
        h = (padded.view(np.uint64) * _MIX).sum(axis=1, dtype=np.uint64)
    return ((h >> np.uint64(17)) % np.uint64(buckets)).astype(np.int64)


def merge_split(positions, cp, mate):
    """Merge identical rows of one split: (unique keys, rows, cp, mate, count)."""
    unique, first, inverse, count = np.unique(
        keys(positions), return_index=True, return_inverse=True, return_counts=True
    )
    inverse = inverse.ravel()
    plain = (mate == 0).astype(np.float64)
    plain_count = np.bincount(inverse, weights=plain, minlength=len(unique))
    cp_sum = np.bincount(inverse, weights=cp * plain, minlength=len(unique))
    has_plain = plain_count > 0
    merged_cp = np.where(has_plain, np.round(cp_sum / np.maximum(plain_count, 1)), 0).astype(np.int32)
    merged_mate = np.where(has_plain, 0, mate[first]).astype(np.int16)
    return unique, positions[first], merged_cp, merged_mate, count.astype(np.int32)


def dedup_bucket(columns: dict) -> tuple[dict, dict, dict]:
    """columns[split] = (positions, cp, mate) -> merged columns per split, duplicates, overlaps removed."""
    out, merged, dropped = {}, {}, {}
    seen = None
    for split in ("test", "val", "train"):  # priority: a test position stays in test
        positions, cp, mate = columns[split]
        unique, rows, new_cp, new_mate, count = merge_split(positions, cp, mate)
        keep = ~np.isin(unique, seen) if seen is not None and len(seen) else np.ones(len(unique), dtype=bool)
        out[split] = {"positions": rows[keep], "cp": new_cp[keep], "mate": new_mate[keep], "count": count[keep]}
        merged[split] = int(len(positions) - len(unique))
        dropped[split] = int((~keep).sum())
        seen = unique if seen is None else np.concatenate([seen, unique])
    return out, merged, dropped


def deduplicate(directory: Path, max_bucket_bytes: float = 2e9) -> dict:
    """Deduplicate a prepared directory in place; returns the counts for meta.json. Peak memory is about
    `max_bucket_bytes`, whatever the data's size: the rows are spread over buckets that fit it, and each
    bucket's result goes to disk before the next is read."""
    sizes = {split: len(np.load(directory / split / "cp.npy", mmap_mode="r")) for split in SPLITS}
    buckets = max(1, math.ceil(sum(sizes.values()) * ROW_BYTES * 3 / max_bucket_bytes))  # np.unique needs ~3x
    parts = directory / "dedup-parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir()
    if buckets > 1:
        partition(directory, parts, buckets, block=max(1 << 12, int(max_bucket_bytes / ROW_BYTES / 8)))
    totals = {"merged": dict.fromkeys(SPLITS, 0), "dropped_overlap": dict.fromkeys(SPLITS, 0), "buckets": buckets}
    names = (*COLUMNS, "count")
    results = {(split, name): open(parts / f"out.{split}.{name}.bin", "wb") for split in SPLITS for name in names}
    try:
        for bucket in range(buckets):
            columns = {split: read_bucket(directory, parts, split, bucket, buckets) for split in SPLITS}
            out, merged, dropped = dedup_bucket(columns)
            del columns
            for split in SPLITS:
                totals["merged"][split] += merged[split]
                totals["dropped_overlap"][split] += dropped[split]
                for name, values in out[split].items():
                    results[split, name].write(np.ascontiguousarray(values).data)
    finally:
        for f in results.values():
            f.close()
    for split in SPLITS:
        for name in names:
            dtype = np.dtype(COLUMNS.get(name, np.int32))
            raw = parts / f"out.{split}.{name}.bin"
            rows = raw.stat().st_size // (dtype.itemsize * (ROW_BYTES if name == "positions" else 1))
            tmp = directory / split / f".tmp-{name}.npy"
            with open(tmp, "wb") as target, open(raw, "rb") as source:
                write_npy_header(target, dtype, (rows, ROW_BYTES) if name == "positions" else (rows,))
                shutil.copyfileobj(source, target, 1 << 22)
            os.replace(tmp, directory / split / f"{name}.npy")
    shutil.rmtree(parts, ignore_errors=True)
    return totals


def partition(directory: Path, parts: Path, buckets: int, block: int = 1 << 20) -> None:
    """Spread every split's rows over bucket files by a hash of the position, a block at a time."""
    for split in SPLITS:
        blocks = {name: npy_blocks(directory / split / f"{name}.npy", block) for name in COLUMNS}
        files = {(b, name): open(parts / f"{b}.{split}.{name}.bin", "wb") for b in range(buckets) for name in COLUMNS}
        try:
            for chunk in (dict(zip(blocks, pieces)) for pieces in zip(*blocks.values())):
                which = bucket_of(chunk["positions"], buckets)
                for b in range(buckets):
                    mask = which == b
                    for name in COLUMNS:
                        chunk[name][mask].tofile(files[b, name])
        finally:
            for f in files.values():
                f.close()


def read_bucket(directory: Path, parts: Path, split: str, bucket: int, buckets: int):
    if buckets == 1:
        return tuple(np.load(directory / split / f"{name}.npy") for name in COLUMNS)
    read = {name: np.fromfile(parts / f"{bucket}.{split}.{name}.bin", dtype=dtype) for name, dtype in COLUMNS.items()}
    return read["positions"].reshape(-1, ROW_BYTES), read["cp"], read["mate"]
