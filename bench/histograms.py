"""What watching every weight and gradient costs: four arms, interleaved, on the chess MLP.

    python bench/histograms.py                 # default 4 x 808 evaluator, batch 1024, on this machine
    python bench/histograms.py --rounds 3 --steps 5 --width 64

Arms (each logs every step): none; kibitz (monitor.py: on-device statistics, one copy, background
sender, TensorBoard raw histograms); TensorBoard's add_histogram of every weight and gradient in an
after-backward hook (the naive way); wandb.watch(log="all", log_freq=1), offline. Each round runs
every arm for --steps steps; medians over rounds. Like wandb's own writer process, kibitz's sender
works beside the loop; whatever it has not sent by the end of a round is waited for inside the round.
Prints the cost of one event (all tensors), the step-time ratios when logging every step, and the
overhead when logging every 100 steps.
"""

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's flat modules

import torch  # noqa: E402

from kibitz import monitor  # noqa: E402
from kibitz.tracking import loggers, sinks  # noqa: E402
from model import ChessEvaluator  # noqa: E402


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per arm per round")
    parser.add_argument("--width", type=int, default=808)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1024)
    return parser.parse_args()


def main() -> None:
    args = arguments()
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    base = ChessEvaluator(args.width, args.depth)
    packed = torch.randint(0, 256, (args.batch, 101), dtype=torch.uint8)
    target = torch.randn(args.batch)
    tmp = Path(tempfile.mkdtemp())
    arms = {name: copy.deepcopy(base) for name in ("none", "kibitz", "tensorboard add_histogram", "wandb.watch")}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in arms.items()}
    names = {name: [n for n, _ in m.named_parameters()] for name, m in arms.items()}

    ours = loggers.Loggers([sinks.TensorBoardLog(tmp / "kibitz", {})])
    naive = SummaryWriter(str(tmp / "naive"))
    run = wandb.init(project="bench", dir=tmp, mode="offline")
    run.watch(arms["wandb.watch"], log="all", log_freq=1)
    steps = {name: 0 for name in arms}

    def train_steps(name: str, count: int) -> float:
        model, optimizer = arms[name], optimizers[name]
        start = time.perf_counter()
        for _ in range(count):
            loss = torch.nn.functional.l1_loss(model(packed), target)
            loss.backward()
            steps[name] += 1
            step = steps[name]
            params = [p for p in model.parameters()]
            if name == "kibitz":
                for prefix, tensors in (("gradients", [p.grad for p in params]), ("parameters", params)):
                    ours.send_histograms(step, prefix, names[name], monitor.tensor_stats(tensors, 64))
            elif name == "tensorboard add_histogram":
                for n, p in zip(names[name], params):
                    naive.add_histogram(f"parameters/{n}", p, step)
                    naive.add_histogram(f"gradients/{n}", p.grad, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if name == "wandb.watch":
                run.log({"loss": loss.item()}, step=step)  # commits the hooks' histograms
            else:
                loss.item()  # every arm reads its loss once per step
        if name == "kibitz":
            ours.sender.flush()  # the background sender's backlog is paid inside the timed region
        return (time.perf_counter() - start) / count

    for name in arms:  # warm up every arm once
        train_steps(name, 2)
    times = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name in arms:  # interleaved: drifts of the machine hit every arm alike
            times[name].append(train_steps(name, args.steps))
    ours.finish()
    naive.close()
    run.finish()

    report({name: statistics.median(t) for name, t in times.items()}, len(names["none"]) * 2, args)


def report(step_time: dict, tensors: int, args) -> None:
    """Each arm's median step, the cost of one histogram event, and kibitz's event against the others'."""
    plain = step_time["none"]
    print(
        f"chess MLP {args.depth} x {args.width}, batch {args.batch}, {tensors} tensors per event, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds of {args.steps} steps; "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"  {'arm':<28}{'step ms':>10}{'event ms':>10}{'x plain':>9}{'every 100 steps':>17}")
    for name, value in step_time.items():
        event = max(value - plain, 0.0)
        print(
            f"  {name:<28}{value * 1e3:>10.1f}{event * 1e3:>10.1f}{value / plain:>8.2f}x"
            f"{100 * event / (100 * plain):>15.2f} %"
        )
    ours_event = max(step_time["kibitz"] - plain, 1e-9)
    for other in ("tensorboard add_histogram", "wandb.watch"):
        print(f"  one event: kibitz costs {ours_event / max(step_time[other] - plain, 1e-9):.2f} of {other}")


if __name__ == "__main__":
    main()
