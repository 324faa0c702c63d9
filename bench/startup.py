"""How long kibitz takes to start, over what it cannot avoid: `import torch, lightning_fabric`, measured in the same
run, interleaved. `python train.py --help` and a training run's set-up should add at most 0.3 s to it.

    python bench/startup.py             # 5 interleaved rounds
    python bench/startup.py --rounds 1  # a smoke test
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = {
    "import torch, lightning_fabric": ["-c", "import torch, lightning_fabric"],
    "python train.py --help": ["train.py", "--help"],
    "import train; cli.parse (a run's flags)": [
        "-c",
        "import train\nfrom kibitz import cli\ncli.parse(['chess', '--train.max-steps', '1'])",
    ],
}


def seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times = {arm: [] for arm in ARMS}
    for _ in range(args.rounds):
        for arm, command in ARMS.items():  # interleaved: drifts of the machine hit every arm alike
            times[arm].append(seconds(command))
    medians = {arm: statistics.median(t) for arm, t in times.items()}
    base = medians["import torch, lightning_fabric"]
    print(f"medians of {args.rounds} interleaved rounds, {time.strftime('%Y-%m-%d')}")
    print(f"  {'arm':<42}{'seconds':>9}{'over base':>11}{'x base':>8}")
    for arm, value in medians.items():
        print(f"  {arm:<42}{value:>9.2f}{value - base:>10.2f}s{value / base:>7.2f}x")


if __name__ == "__main__":
    main()
