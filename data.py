"""Task-agnostic batching: datasets of aligned arrays, the resumable epoch order, and loaders.

A dataset is indexed by an array of indices and returns a whole batch with one gather, a tuple of
tensors (one per array); the loop moves it to the device. The chess tasks hold memory-mapped packed
positions here, examples/charlm.py windows of a text file.
"""

import numpy as np
import torch


class ArrayDataset(torch.utils.data.Dataset):
    """Aligned arrays (numpy, memory-mapped or not) sharing their first dimension; a batch is
    `tuple(torch.from_numpy(array[index]) for array in arrays)`."""

    def __init__(self, *arrays: np.ndarray):
        if not arrays or any(len(a) != len(arrays[0]) for a in arrays):
            raise ValueError(f"ArrayDataset: expected arrays of one length, got {[len(a) for a in arrays]}")
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, index: np.ndarray) -> tuple[torch.Tensor, ...]:
        index = np.sort(index)  # sequential reads from a memmap; order inside a batch does not matter
        return tuple(torch.from_numpy(np.ascontiguousarray(a[index])) for a in self.arrays)


class EpochBatches(torch.utils.data.Sampler):
    """Yields arrays of indices, one per batch, for this rank.

    The order of an epoch is a pure function of (seed, epoch), so a run resumed mid-epoch sees the
    batches the interrupted run would have. Each rank takes every world_size-th index, so every
    example appears once per epoch across ranks. Every rank yields the same number of batches: for
    training the tail that does not fill a batch on every rank is dropped; for evaluation
    (drop_last=False) a rank one example short may end on a short or empty batch, since under FSDP
    each forward is a collective that every rank must take part in.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        max_batches: int | None = None,
    ):
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.max_batches = rank, world_size, drop_last, max_batches
        self.epoch, self.skip = 0, 0

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch to iterate next and how many of its batches to skip (when resuming).
        (Not named set_epoch: Fabric's loader wrapper calls that with its own counter.)"""
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        if self.drop_last:
            batches = self.size // self.world_size // self.batch_size
        else:
            most = -(-self.size // self.world_size)  # the examples of the fullest rank (ceil division)
            batches = -(-most // self.batch_size)
        return batches if self.max_batches is None else min(batches, self.max_batches)  # the first ones

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        mine = order[self.rank :: self.world_size]
        for batch in range(self.skip, len(self)):
            yield mine[batch * self.batch_size : (batch + 1) * self.batch_size]


class DeviceBatches:
    """A split held in device memory (the 37M-position chess set is 3.7 GB packed): a batch is one
    gather there. The order comes from the same sampler, so batches equal the memory-mapped loader's."""

    def __init__(self, dataset: ArrayDataset, sampler: EpochBatches, device: torch.device):
        self.arrays = [torch.from_numpy(np.array(a)).to(device) for a in dataset.arrays]  # read a memmap once
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for index in self.sampler:
            index = torch.from_numpy(np.sort(index)).to(self.arrays[0].device, non_blocking=True)
            yield tuple(a[index] for a in self.arrays)


def make_loader(
    dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    rank: int,
    world_size: int,
    drop_last: bool,
    num_workers: int = 0,
    device: torch.device | None = None,
    max_batches: int | None = None,
):
    """Batches for one rank: from the memory map (a DataLoader; Fabric moves them to the device), or,
    given a device, from a copy of the split kept there (an ArrayDataset). `max_batches`: only the first ones
    (every rank the same number)."""
    sampler = EpochBatches(len(dataset), batch_size, shuffle, seed, rank, world_size, drop_last, max_batches)
    if device is not None:
        return DeviceBatches(dataset, sampler, device)
    # batch_size=None: the sampler already yields whole batches, the dataset gathers them at once.
    # Its own generator: otherwise every iter(loader) draws a seed from the global RNG, and a resumed
    # run, which starts one more iterator, would see different random numbers afterwards.
    return torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed + rank),
    )
