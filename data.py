"""Chess data: lichess PGN -> packed 101-byte positions on disk -> batches for the trainer.

    python data.py prepare data/sample.pgn.zst --out data/cache/sample
    python data.py dump data/cache/sample --split test --limit 5
    python data.py make-sample            # regenerate data/sample.pgn.zst with Stockfish

A prepared directory (see prepare.py) holds, per split (train/val/test), `positions.npy` (N x 101
uint8, see encoding.py), `cp.npy` (int32 centipawns, White's view) and `mate.npy` (int16, +-N = mate
in N, 0 = none), plus `meta.json`, written last, so its presence means the directory is complete.
Raw evals are stored; the training target (clamped pawns) is chosen when the data is loaded.
"""

import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import tyro

import prepare as preparation
from encoding import ROW_BYTES, row_to_fen
from pgn import format_eval

SPLITS = preparation.SPLITS
SAMPLE_PGN = Path(__file__).parent / "data" / "sample.pgn.zst"


def prepare(sources: Annotated[list[Path], tyro.conf.Positional], out: Path,
            val_fraction: float = 0.05, test_fraction: float = 0.05, max_games: int | None = None,
            workers: int = 0, games_per_chunk: int = 20_000, min_ply: int = 0, min_elo: int | None = None,
            max_elo: int | None = None, time_controls: list[str] | None = None, dedup: bool = True) -> dict:
    """Read lichess `.pgn` / `.pgn.zst` files and write packed positions with their evals.

    Args:
        sources: PGN files (`.pgn` or `.pgn.zst`) in lichess export form, with `%eval` comments.
        out: Output directory.
        val_fraction: Share of games that go to the validation split.
        test_fraction: Share of games that go to the test split.
        max_games: Stop after this many games have been read (all games when unset).
        workers: Parallel parsing processes (0 = all cores). The output does not depend on it.
        games_per_chunk: Games read per unit of work (and per restartable shard).
        min_ply: Skip games with fewer evaluated positions than this.
        min_elo: Keep games whose two players are both rated at least this.
        max_elo: Keep games whose two players are both rated at most this.
        time_controls: Keep only these TimeControl header values (e.g. 180+2 600+0).
        dedup: Merge identical positions within a split (mean eval, count.npy) and remove positions of
            test from val and train, and of val from train.
    """
    filters = preparation.Filters(val_fraction, test_fraction, min_ply, min_elo, max_elo,
                                  tuple(time_controls) if time_controls is not None else None, dedup)
    return preparation.prepare(sources, out, filters, max_games, workers, games_per_chunk)


def ensure_prepared(sources: list[Path], out: Path) -> dict:
    """Prepare `out` from `sources` unless a complete preparation of the same sources is there.

    Jobs that reach one data folder together (the first rank of each node on a shared filesystem, two
    runs started at once) take turns through a lock file beside it: one prepares, the others then find
    it complete. Without the lock they would write the same shard files at once."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        except (ImportError, OSError):  # no fcntl (Windows), or a filesystem without locks: no turn-taking
            pass
        meta_path = out / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("sources") == [str(s) for s in sources] and \
                    meta.get("layout_version") == preparation.LAYOUT_VERSION:
                return meta
        return prepare(sources, out)


def dump(directory: Annotated[Path, tyro.conf.Positional], split: str = "test", limit: int | None = 10) -> None:
    """Print stored positions as `FEN<TAB>EVAL`, the FEN rebuilt from the stored bits.

    Args:
        directory: A directory written by `prepare`.
        split: train, val or test.
        limit: Number of positions to print (all when unset).
    """
    arrays = load_split(directory, split)
    count = len(arrays["cp"]) if limit is None else min(limit, len(arrays["cp"]))
    for i in range(count):
        print(f"{row_to_fen(arrays['positions'][i])}\t{format_eval(int(arrays['cp'][i]), int(arrays['mate'][i]))}")


def make_sample(out: Path = SAMPLE_PGN, games: int = 3000, depth: int = 8, workers: int = 2, seed: int = 0,
                random_rate: float = 0.08, engine: str | None = None) -> None:
    """Generate the bundled sample: Stockfish self-play in lichess PGN form, zstd-compressed.

    Args:
        out: Output `.pgn.zst` file.
        games: Number of games.
        depth: Stockfish search depth for every eval.
        workers: Parallel engines (one process each).
        seed: Base seed; game i uses its own seed derived from it.
        random_rate: Chance that a move after the opening is random instead of the engine's choice.
        engine: Path to the stockfish binary (searched on PATH and /usr/games when unset).
    """
    import sample  # needs an engine; imported only here

    sample.make_sample(out, games, depth, workers, seed, random_rate, engine)


def load_split(directory: Path, split: str) -> dict[str, np.ndarray]:
    """Memory-map one split of a prepared directory."""
    if split not in SPLITS:
        raise SystemExit(f"error: split {split!r}: expected one of {', '.join(SPLITS)}")
    if not (directory / "meta.json").is_file():
        raise SystemExit(f"error: {directory}: not a prepared data directory (no meta.json; run data.py prepare)")
    arrays = {name: np.load(directory / split / f"{name}.npy", mmap_mode="r") for name in ("positions", "cp", "mate")}
    if arrays["positions"].ndim != 2 or arrays["positions"].shape[1] != ROW_BYTES:
        raise SystemExit(f"error: {directory / split / 'positions.npy'}: expected N x {ROW_BYTES} uint8 rows, "
                         f"got shape {arrays['positions'].shape}")
    return arrays


def eval_target(cp: np.ndarray, mate: np.ndarray, clamp: float) -> np.ndarray:
    """Training target: pawns from White's view clamped to +-clamp; mates map to the clamp with their sign."""
    pawns = np.clip(cp.astype(np.float32) / 100, -clamp, clamp)
    return np.where(mate != 0, np.sign(mate).astype(np.float32) * clamp, pawns).astype(np.float32)


class PackedPositions(torch.utils.data.Dataset):
    """One split as packed rows. Indexed by an array of indices, it returns a whole batch with one
    gather: (uint8 positions B x 101, float32 targets B). Bits are unpacked later, on the device."""

    def __init__(self, directory: Path, split: str, clamp: float):
        arrays = load_split(directory, split)
        self.positions = arrays["positions"]
        self.targets = eval_target(np.asarray(arrays["cp"]), np.asarray(arrays["mate"]), clamp)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.sort(index)  # sequential reads from the memmap; order inside a batch does not matter
        return torch.from_numpy(self.positions[index]), torch.from_numpy(self.targets[index])


class EpochBatches(torch.utils.data.Sampler):
    """Yields arrays of indices, one per batch, for this rank.

    The order of an epoch is a pure function of (seed, epoch), so a run resumed mid-epoch sees the
    batches the interrupted run would have. Each rank takes every world_size-th index, so every
    example appears once per epoch across ranks. Every rank yields the same number of batches: for
    training the tail that does not fill a batch on every rank is dropped; for evaluation
    (drop_last=False) a rank one example short may end on a short or empty batch, since under FSDP
    each forward is a collective that every rank must take part in.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.skip = 0, 0

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch to iterate next and how many of its batches to skip (when resuming).
        (Not named set_epoch: Fabric's loader wrapper calls that with its own counter.)"""
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // self.world_size // self.batch_size
        most = -(-self.size // self.world_size)  # the examples of the fullest rank (ceil division)
        return -(-most // self.batch_size)

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        mine = order[self.rank::self.world_size]
        for batch in range(self.skip, len(self)):
            yield mine[batch * self.batch_size:(batch + 1) * self.batch_size]


class DeviceBatches:
    """A split held in device memory (the 37M-position set is 3.7 GB packed): a batch is one gather
    there. The order comes from the same sampler, so batches equal the memory-mapped loader's."""

    def __init__(self, dataset: PackedPositions, sampler: EpochBatches, device: torch.device):
        self.positions = torch.from_numpy(np.array(dataset.positions)).to(device)  # read the memmap once
        self.targets = torch.from_numpy(dataset.targets).to(device)
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for index in self.sampler:
            index = torch.from_numpy(np.sort(index)).to(self.positions.device, non_blocking=True)
            yield self.positions[index], self.targets[index]


def make_loader(dataset: PackedPositions, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int,
                drop_last: bool, num_workers: int = 0, device: torch.device | None = None):
    """Batches for one rank: from the memory map (a DataLoader; Fabric moves them to the device), or,
    given a device, from a copy of the split kept there."""
    sampler = EpochBatches(len(dataset), batch_size, shuffle, seed, rank, world_size, drop_last)
    if device is not None:
        return DeviceBatches(dataset, sampler, device)
    # batch_size=None: the sampler already yields whole batches, the dataset gathers them at once.
    # Its own generator: otherwise every iter(loader) draws a seed from the global RNG, and a resumed
    # run, which starts one more iterator, would see different random numbers afterwards.
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0,
                                       generator=torch.Generator().manual_seed(seed + rank))


if __name__ == "__main__":
    try:
        tyro.extras.subcommand_cli_from_dict({"prepare": prepare, "dump": dump, "make-sample": make_sample})
    except BrokenPipeError:  # `dump | head`
        sys.stderr.close()
