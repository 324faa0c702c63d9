"""What reading a folder of shards as data costs: kibitz's checked save and load against torch's own, in one run.

    python bench/checkpoints.py                 # 10 x Linear(808, 808) with AdamW's state, 5 rounds
    python bench/checkpoints.py --width 2048    # a larger model

Arms, each timed in the same process on the same folder (best of the rounds):
- save: torch's dcp.save of the model and optimizer state (the baseline), then kibitz's save: the same write, the
  checksums beside the shards and the check of what was written (`storage.verify(crc=False)`);
- load: torch's dcp.load with its own reader and planner (the baseline: it unpickles the folder's index and values
  without restriction), then kibitz's `checkpoints.load` of the same folder: the whole check first (the index by the
  allow-list, every item's place, every value, the CRC-32s), then the load through kibitz's reader and planner.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's flat modules

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from lightning_fabric import Fabric  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict  # noqa: E402

from kibitz import checkpoints, storage  # noqa: E402


def model_and_optimizer(width: int, depth: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, width)).sum().backward()
    optimizer.step()  # the optimizer has its state, as in a checkpoint of a run
    return model, optimizer


def state_of(model, optimizer) -> dict:
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def save_torch(state: dict, folder: Path) -> None:
    storage.remove(folder)
    with storage.without_process_group_warning():
        dcp.save(state, checkpoint_id=folder)
    torch.save({"progress": {"step": 1}}, folder / "meta.pt")


def save_kibitz(state: dict, folder: Path) -> None:
    save_torch(state, folder)
    (folder / storage.CHECKSUMS).write_text(json.dumps(storage.folder_checksums(folder), indent=1))
    storage.verify(folder, crc=False)


def load_torch(model, optimizer, folder: Path) -> None:
    state = state_of(model, optimizer)
    with storage.without_process_group_warning():
        dcp.load(state, checkpoint_id=folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=808)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, optimizer = model_and_optimizer(args.width, args.depth)
    state = state_of(model, optimizer)
    fabric = Fabric(accelerator="cpu", devices=1)
    times = {"save": [], "save kibitz": [], "load": [], "load kibitz": []}
    objects = {"model": model, "optimizer": optimizer}
    with tempfile.TemporaryDirectory() as tmp:
        torch_folder, kibitz_folder = Path(tmp) / "torch.ckpt", Path(tmp) / "kibitz.ckpt"
        for _ in range(args.rounds):  # the arms alternate, so a noisy moment costs both
            times["save"].append(timed(lambda: save_torch(state, torch_folder)))
            times["save kibitz"].append(timed(lambda: save_kibitz(state, kibitz_folder)))
            times["load"].append(timed(lambda: load_torch(model, optimizer, torch_folder)))
            times["load kibitz"].append(timed(lambda: checkpoints.load(fabric, kibitz_folder, objects)))
        size = sum(f.stat().st_size for f in kibitz_folder.iterdir()) / 2**20
    best = {arm: min(seconds) for arm, seconds in times.items()}
    layers = f"{args.depth} x Linear({args.width})"
    print(f"a folder of shards of {size:.0f} MB ({layers} and AdamW's state), best of {args.rounds}")
    print(f"  {'arm':<54}{'seconds':>10}{'ratio':>8}")
    rows = [
        ("save: torch's dcp.save", "save", "save"),
        ("save: kibitz (checksums, the check of the folder)", "save kibitz", "save"),
        ("load: torch's dcp.load (unrestricted unpickling)", "load", "load"),
        ("load: kibitz (checked whole, its reader and planner)", "load kibitz", "load"),
    ]
    for label, arm, baseline in rows:
        print(f"  {label:<54}{best[arm]:>10.3f}{best[arm] / best[baseline]:>8.2f}")


if __name__ == "__main__":
    main()
