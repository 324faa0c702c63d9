"""A per-example Dataset through kibitz's loader against a plain DataLoader loop over the same Dataset; prints
samples/s of each and their ratio, measured in this run (interleaved rounds, medians).

    python bench/per_example.py                     # 0 and 2 workers, 5 rounds of 65,536 examples
    python bench/per_example.py --workers 2 --rounds 1 --examples 2048  # a smoke test

The Dataset is what a tutorial's looks like: 8x8 images stored as uint8, each example converted to float, randomly
shifted and noised (torch ops, a few tens of microseconds), returned as a dict. Both arms shuffle, batch 64 with
torch's default_collate, in the same number of worker processes, and end each batch on the CPU device; kibitz's
also seeds the batch's augmentation by (seed, rank, epoch, batch), which makes resume exact.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's flat modules

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402


class Digits(torch.utils.data.Dataset):
    def __init__(self, count: int):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 17, size=(count, 8, 8), dtype=np.uint8)
        self.labels = rng.integers(0, 10, size=count)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(self.images[i]).float().div_(16)
        shift = torch.randint(-1, 2, (2,))
        image = torch.roll(image, (int(shift[0]), int(shift[1])), dims=(0, 1)) + 0.05 * torch.randn(8, 8)
        return {"image": image[None], "label": int(self.labels[i])}


def samples_per_s(loader, count: int) -> float:
    started = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += len(train.to_device(batch, torch.device("cpu"))["label"])
    assert seen >= count * 0.95, seen
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--examples", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    dataset = Digits(args.examples)
    torch.set_num_threads(1)
    print(f"{args.examples} examples, batch {args.batch_size}, {args.rounds} interleaved rounds (medians)")
    for workers in args.workers:
        plain = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(0),
        )
        ours = data.make_loader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=workers)
        rates = {"plain DataLoader": [], "kibitz": []}
        for epoch in range(args.rounds):
            ours.sampler.start_epoch(epoch)
            rates["plain DataLoader"].append(samples_per_s(plain, args.examples))
            rates["kibitz"].append(samples_per_s(ours, args.examples))
        medians = {arm: statistics.median(r) for arm, r in rates.items()}
        for arm, rate in medians.items():
            print(f"  {workers} workers  {arm:<18}{rate:>10,.0f} samples/s")
        print(f"  {workers} workers  ratio kibitz / plain: {medians['kibitz'] / medians['plain DataLoader']:.3f}x")


if __name__ == "__main__":
    main()
