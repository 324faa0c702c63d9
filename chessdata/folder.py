"""The prepared-folder format, defined once.

A prepared folder holds, per split (train/val/test), `positions.npy` (N x 101 uint8, see encoding.py),
`cp.npy` (int32 centipawns, White's view), `mate.npy` (int16, +-N = mate in N, 0 = none, +-32767 = mate already
given: the side to move is mated; the sign says who mates, as everywhere) and, when
deduplicated, `count.npy`; `meta.json`, written last, says the folder is complete and what made it.
Raw evals are stored; a training target (say, clamped pawns) is chosen when the data is loaded.
"""

import hashlib
from pathlib import Path

import numpy as np

from chessdata.encoding import ROW_BYTES

SPLITS = ("train", "val", "test")
COLUMNS = {"positions": np.uint8, "cp": np.int32, "mate": np.int16}
LAYOUT_VERSION = 3  # 2: deduplicated splits with count.npy; 3: one key per position across sources, FEN games
SAMPLE_PGN = Path(__file__).resolve().parent.parent / "data" / "sample.pgn.zst"


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a game (its text) or a position (its FEN's first four fields), by a hash: stable
    across runs and when more files are added."""
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2**64
    if bucket < test_fraction:
        return "test"
    return "val" if bucket < test_fraction + val_fraction else "train"


def load_split(directory: Path, split: str) -> dict[str, np.ndarray]:
    """Memory-map one split of a prepared folder."""
    if split not in SPLITS:
        raise SystemExit(f"error: split {split!r}: expected one of {', '.join(SPLITS)}")
    if not (directory / "meta.json").is_file():
        raise SystemExit(
            f"error: {directory}: not a prepared data directory (no meta.json; run python -m chessdata prepare)"
        )
    damaged = "a damaged folder: delete it to prepare again"
    names = [*COLUMNS, *(["count"] if (directory / split / "count.npy").exists() else [])]
    arrays = {}
    for name in names:
        path = directory / split / f"{name}.npy"
        try:
            arrays[name] = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise SystemExit(f"error: {path}: missing ({damaged})") from None
        except (OSError, ValueError) as exc:  # truncated, not an .npy file
            raise SystemExit(f"error: {path}: cannot be read ({exc}; {damaged})") from None
        if name in COLUMNS and arrays[name].dtype != COLUMNS[name]:
            raise SystemExit(
                f"error: {path}: expected {np.dtype(COLUMNS[name])} values, got {arrays[name].dtype} ({damaged})"
            )
    if arrays["positions"].ndim != 2 or arrays["positions"].shape[1] != ROW_BYTES:
        raise SystemExit(
            f"error: {directory / split / 'positions.npy'}: expected N x {ROW_BYTES} uint8 rows, "
            f"got shape {arrays['positions'].shape} ({damaged})"
        )
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise SystemExit(f"error: {directory / split}: the arrays' lengths differ, {lengths} ({damaged})")
    return arrays


def write_npy_header(file, dtype, shape: tuple) -> None:
    """The header of an .npy file whose rows the caller then writes itself, in order: the file grows on disk
    without an array (or a memory map, whose written pages count as the process's memory) the size of it."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(file, header)


def npy_blocks(path: Path, rows: int):
    """An .npy file's rows, `rows` at a time, read (not memory-mapped: mapped pages stay in the process's memory
    for as long as the map lives, which would grow it with the file)."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        row = int(np.prod(shape[1:], dtype=np.int64))
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            yield np.fromfile(f, dtype=dtype, count=count * row).reshape(count, *shape[1:])


def eval_target(cp: np.ndarray, mate: np.ndarray, clamp: float) -> np.ndarray:
    """Pawns from White's view clamped to +-clamp; mates map to the clamp with their sign."""
    pawns = np.clip(cp.astype(np.float32) / 100, -clamp, clamp)
    return np.where(mate != 0, np.sign(mate).astype(np.float32) * clamp, pawns).astype(np.float32)
