"""Task-agnostic batching: any map-style dataset to resumable batches.

A split is either
- an `ArrayDataset`: aligned arrays, a batch one gather of an array of indices (the chess tasks' memory-mapped
  packed positions, examples/charlm.py's windows of a text file): the fast path;
- any other `torch.utils.data.Dataset` with `__len__` and a per-example `__getitem__` (the torchvision habit):
  its examples are read and collated a batch at a time (`ExampleBatches`), in worker processes if asked;
- a stream, a `torch.utils.data.IterableDataset` (records read from files or a socket, a dataset bigger than the
  disk, a Hugging Face `datasets` stream): batched by torchdata's StatefulDataLoader (`Stream`), whose position
  every checkpoint holds.
For the first two the order of an epoch is a pure function of (seed, epoch) (`EpochBatches`), so a resumed run
sees the batches the interrupted one would have; a stream resumes from its own state_dict.
"""

import copy
import random
import sys
import warnings

import numpy as np
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device

from config import ConfigError


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


class ExampleBatches(torch.utils.data.Dataset):
    """A per-example dataset read a batch at a time: `self[(epoch, number, indices)]` is the batch of those examples,
    collated (torch's default_collate: dicts, tuples and nested structures of tensors and numbers, batched; or the
    task's own `collate`), inside the worker process that reads it.

    The random numbers drawn while reading a batch (augmentation in `__getitem__`) come from torch's, numpy's and
    python's generators seeded by (seed, rank, epoch, batch number): the same batch gets the same augmentation
    whichever worker reads it, however many workers there are and however many batches a resumed run skipped. In
    the main process (no workers) torch's and python's generators are restored afterwards, so reading data never
    shifts the training's random numbers (dropout, noise); numpy's global one is left seeded from the batch."""

    def __init__(self, dataset, collate=None, seed: int = 0, rank: int = 0):
        self.dataset, self.collate = dataset, collate or torch.utils.data.default_collate
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, batch: tuple[int, int, np.ndarray]):
        epoch, number, indices = batch
        seed = hash((self.seed, self.rank, epoch, number)) & 0xFFFFFFFF  # ints hash the same in every process
        in_worker = torch.utils.data.get_worker_info() is not None
        cpu = torch.default_generator  # torch.manual_seed would also seed every other device's: 100 times slower
        saved = None if in_worker else (cpu.get_state(), random.getstate())
        cpu.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            return self.collate([self.dataset[i] for i in indices.tolist()])
        finally:
            if saved is not None:
                cpu.set_state(saved[0])
                random.setstate(saved[1])
                np.random.seed(seed ^ 0x5EED)  # saving numpy's state costs 70 us a batch: a fresh seed of its own


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
        numbered: bool = False,
    ):
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.max_batches = rank, world_size, drop_last, max_batches
        self.numbered = numbered  # yield (epoch, batch number, indices), what ExampleBatches seeds from
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
            indices = mine[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield (self.epoch, batch, indices) if self.numbered else indices


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


class Stream:
    """A stream's batches for one rank. It has no epochs: training reads it until train.max_steps or max_time, and a
    stream that ends is read again from its start; an evaluation reads it from its start, at most `max_batches`.
    `state_dict` is the position in it (the dataset's own state_dict, gathered from the worker processes)."""

    def __init__(self, dataset, batch_size: int, collate, num_workers: int, pin_memory: bool, max_batches, endless):
        try:
            from torchdata.stateful_dataloader import StatefulDataLoader
        except ImportError:
            raise ValueError("a stream (an IterableDataset) is read by torchdata: pip install -e '.[stream]'") from None
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch function as it starts
            warnings.simplefilter("ignore", UserWarning)
            # workers not persistent: each pass forks them with the dataset rewound here
            self.loader = StatefulDataLoader(
                dataset,
                batch_size=batch_size,
                collate_fn=collate,
                num_workers=num_workers,
                pin_memory=pin_memory,
                drop_last=endless,
                worker_init_fn=end_with_parent,
            )
        self.dataset, self.max_batches, self.endless = dataset, max_batches, endless
        self.start = copy.deepcopy(dataset.state_dict()) if hasattr(dataset, "state_dict") else None
        self.sampler = self  # what the loop and tasks call start_epoch on
        self.device = None  # where an evaluation's batches go (the loop moves training batches itself)

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """No epochs: where to continue comes from load_state_dict."""

    def __len__(self) -> int:
        return sys.maxsize if self.endless else self.max_batches or sys.maxsize

    def __iter__(self):
        count, passes = 0, 0
        while True:
            if passes or not self.endless:  # an evaluation, or training's next pass: from the stream's start
                self.rewind()
            before, passes = count, passes + 1
            for batch in self.loader:
                yield batch if self.device is None else move_data_to_device(batch, self.device)
                count += 1
                if not self.endless and count == self.max_batches:
                    return
            if not self.endless:
                return
            if count == before:  # read again from its start, it would loop here for ever
                raise ConfigError(
                    "data: the training stream yielded no batch (empty, or fewer examples than a batch for each of "
                    "its reading processes: data.num_workers x the ranks)"
                )

    def rewind(self) -> None:
        """Back to the stream's start (a capped evaluation, or a resumed position, would otherwise carry over)."""
        if self.start is not None:
            self.dataset.load_state_dict(copy.deepcopy(self.start))

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def evaluated_on(fabric, loader):
    """An evaluation loader whose batches arrive on the device: Fabric's wrapper for a DataLoader, the stream's own
    move for a stream (Fabric wraps DataLoaders only)."""
    if isinstance(loader, Stream):
        loader.device = fabric.device
        return loader
    return fabric.setup_dataloaders(loader, use_distributed_sampler=False)


def is_stream(dataset) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


def size(dataset) -> int | None:
    """The examples in a split (None for a stream: unknown until read)."""
    return None if is_stream(dataset) else len(dataset)


def reader_part() -> tuple[int, int]:
    """(index, count) of this reader among all that read a stream: this rank's worker process among every rank's.
    A stream's __iter__ keeps every count-th record starting at the index-th, so each record is read once."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if initialized else (0, 1)
    info = torch.utils.data.get_worker_info()
    workers, worker = (info.num_workers, info.id) if info else (1, 0)
    return rank * workers + worker, world * workers


def make_loader(
    dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    num_workers: int = 0,
    device: torch.device | None = None,
    max_batches: int | None = None,
    collate=None,
    pin_memory: bool = False,
):
    """Batches for one rank: from the memory map or the per-example dataset (a DataLoader; the loop or Fabric
    moves them to the device), or, given a device, from a copy of the split kept there (an ArrayDataset only).
    `max_batches`: only the first ones (every rank the same number)."""
    if is_stream(dataset):
        return Stream(dataset, batch_size, collate, num_workers, pin_memory, max_batches, endless=drop_last)
    gathers = isinstance(dataset, ArrayDataset)
    sampler = EpochBatches(
        len(dataset), batch_size, shuffle, seed, rank, world_size, drop_last, max_batches, numbered=not gathers
    )
    if device is not None and gathers:
        return DeviceBatches(dataset, sampler, device)
    # batch_size=None: the sampler yields whole batches, which the dataset reads at once (a gather, or a batch of
    # examples collated). Its own generator: otherwise every iter(loader) draws a seed from the global RNG, and a
    # resumed run, which starts one more iterator, would see different random numbers afterwards.
    return torch.utils.data.DataLoader(
        dataset if gathers else ExampleBatches(dataset, collate, seed, rank),
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed + rank),
        worker_init_fn=end_with_parent,
    )


def end_with_parent(worker_id: int) -> None:
    """A DataLoader worker ends the moment its run does (Linux's parent-death signal): a run killed with SIGKILL
    leaves no worker behind to print its lost connection as a traceback."""
    if sys.platform == "linux":
        import ctypes
        import signal
        import threading
        import time

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        previous = threading.excepthook

        def after_a_moment(args) -> None:
            # The thread that hands batches to the run sees the run's sockets close a moment before the kernel
            # kills this worker for its parent's death. Waiting lets that kill come first; a real error still prints.
            time.sleep(1)
            previous(args)

        threading.excepthook = after_a_moment


def make_loaders(fabric, cfg, task, datasets: dict, micro_batch: int) -> tuple[object, dict, int]:
    """This rank's training loader, its val and test loaders, and the optimizer steps in an epoch; a split that
    cannot be used as configured is one line (ConfigError)."""
    rank, world, train = fabric.global_rank, fabric.world_size, datasets["train"]
    on_device = fabric.device if cfg.data.on_device else None
    pin = fabric.device.type == "cuda"  # per-example batches, copied to the GPU without blocking
    train_loader = make_loader(
        train,
        batch_size=micro_batch,
        shuffle=True,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        device=on_device,
        collate=task.collate,
        pin_memory=pin,
    )
    eval_loaders = {
        split: eval_loader(
            fabric,
            datasets[split],
            batch_size=cfg.data.eval_batch_size,
            collate=task.collate,
            on_device=cfg.data.on_device,
            max_batches=cfg.train.val_batches if split == "val" else None,
        )
        for split in ("val", "test")
    }
    for split in ("val", "test") if cfg.train.val_every is not None else ("test",):
        if not is_stream(datasets[split]) and len(datasets[split]) == 0:  # a stream's length is unknown until read
            hint = "; --train.val-every None trains without validation" if split == "val" else ""
            raise ConfigError(f"data: the {split} split holds no examples (nothing to evaluate on{hint})")
    if is_stream(train) and cfg.train.max_epochs is not None:
        raise ConfigError("train.max_epochs: a stream has no epochs; bound the run with train.max_steps or max_time")
    steps_per_epoch = len(train_loader.sampler) // cfg.train.accumulate
    if not is_stream(train) and len(train) == 0:
        raise ConfigError("data: the train split holds no examples (nothing to train on)")
    if steps_per_epoch == 0:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} exceeds the {len(train)} training examples")
    return train_loader, eval_loaders, steps_per_epoch


def eval_loader(fabric, dataset, *, batch_size: int, collate=None, on_device: bool = False, max_batches=None):
    """This rank's part of an evaluation split, from its first batch, arriving on the device: kept there
    (`data.on_device`), or moved there by Fabric a batch at a time. The training batches are moved by the loop itself
    (Fabric's loader wrapper costs about 35 us a step in Python); evaluation is not on the hot path."""
    loader = make_loader(
        dataset,
        batch_size=batch_size,
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        device=fabric.device if on_device else None,
        max_batches=max_batches,
        collate=collate,
        pin_memory=fabric.device.type == "cuda",
    )
    return loader if on_device else evaluated_on(fabric, loader)


def micro_batch_size(cfg, world_size: int) -> int:
    """The examples one process takes per forward: the batch split over devices and accumulation steps."""
    micro_batch, remainder = divmod(cfg.data.batch_size, cfg.train.accumulate * world_size)
    if remainder or micro_batch == 0:
        raise ConfigError(
            f"data.batch_size: expected a multiple of train.accumulate x devices "
            f"({cfg.train.accumulate} x {world_size}), got {cfg.data.batch_size}"
        )
    return micro_batch
