"""The built-in tasks' pictures of their test results, drawn into the run folder whatever the logger (and also
logged as images to wandb or TensorBoard). Task hooks at `on_test_end` (tasks.py) call these on the best
checkpoint's model, after the test metrics:

  chess  test_predictions.png      the evaluator against Stockfish on test positions, and the error by |eval|
         test_error_by_eval.json   the same buckets as numbers
  dvae   test_reconstructions.png  test boards beside their reconstructions, the wrong squares marked
"""

import math
from pathlib import Path

import numpy as np
import torch

from callbacks import save_figure
from kibitz import distributed

EVAL_EDGES = (0, 0.5, 1, 2, 4, 8)  # pawns; then up to the clamp, then the clamped evals (mates among them)
PIECE_GLYPHS = " ♔♕♖♗♘♙♚♛♜♝♞♟"  # square tokens 0..12: empty, K Q R B N P k q r b n p (encoding.board_tokens)


def publish(run, path: Path, name: str, draw) -> None:
    """Rank 0 draws `path` (draw(path)) and logs it as the image `name`. A picture that cannot be drawn warns;
    it never fails a finished run."""
    if not run.fabric.is_global_zero:
        return
    try:
        draw(path)
    except Exception as exc:
        print(f"warning: {path.name} not drawn ({type(exc).__name__}: {exc})", flush=True)
        return
    if run.loggers is not None:
        run.loggers.log_image(name, path, run.step)


def spread(count: int, size: int) -> np.ndarray:
    """`size` indices spread evenly over range(count) (all of them if there are fewer)."""
    return np.unique(np.linspace(0, count - 1, min(count, size)).round().astype(np.int64)) if count else np.arange(0)


@torch.no_grad()
def predict(model, inputs: np.ndarray, device, batch_size: int, to_output) -> np.ndarray:
    """`to_output(model(batch))` over `inputs` in batches, in eval mode, on the host. Every rank calls it (under
    FSDP the forward gathers parameters from all of them)."""
    module = distributed.unwrapped(model)
    was_training = module.training
    module.eval()
    outputs = [
        to_output(module(torch.from_numpy(inputs[i : i + batch_size]).to(device))).float().cpu()
        for i in range(0, len(inputs), batch_size)
    ]
    module.train(was_training)
    return torch.cat(outputs).numpy() if outputs else np.zeros(0, dtype=np.float32)


def error_by_eval(targets: np.ndarray, predictions: np.ndarray, clamp: float) -> list[dict]:
    """Mean absolute error (pawns) of the positions in each |eval| bucket; None for an empty bucket."""
    size, error = np.abs(targets), np.abs(predictions - targets)
    edges = [e for e in EVAL_EDGES if e < clamp] + [clamp]
    buckets = [(f"{low:g}-{high:g}", (size >= low) & (size < high)) for low, high in zip(edges, edges[1:])]
    buckets.append((f"{clamp:g} (clamped, mates)", size >= clamp))
    return [
        {"abs_eval": name, "positions": int(inside.sum()), "l1": float(error[inside].mean()) if inside.any() else None}
        for name, inside in buckets
    ]


def draw_predictions(path: Path, targets: np.ndarray, predictions: np.ndarray, clamp: float, buckets: list[dict]):
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend is left alone; imported when drawn

    fig = Figure(figsize=(12, 5))
    fig.subplots_adjust(left=0.06, right=0.96, bottom=0.17, top=0.92, wspace=0.25)
    scatter, bars = fig.subplots(1, 2, width_ratios=(1, 1.3))
    cells = scatter.hexbin(targets, predictions, gridsize=60, bins="log", cmap="viridis", mincnt=1)
    fig.colorbar(cells, ax=scatter, label="positions")
    scatter.plot([-clamp, clamp], [-clamp, clamp], color="red", linewidth=1, label="prediction = Stockfish")
    scatter.set(
        xlabel="Stockfish eval (pawns, clamped)",
        ylabel="predicted (pawns)",
        xlim=(-clamp * 1.05, clamp * 1.05),
        ylim=(-clamp * 1.05, clamp * 1.05),
    )
    scatter.set_title(f"{len(targets)} test positions", y=1.0)  # a fixed place: cheaper to draw
    scatter.legend(loc="upper left", fontsize=8)
    names = [b["abs_eval"] for b in buckets]
    values = [b["l1"] if b["l1"] is not None else math.nan for b in buckets]
    drawn = bars.bar(range(len(buckets)), values, color="tab:blue")
    bars.bar_label(drawn, labels=[f"{b['positions']}" for b in buckets], fontsize=8, padding=2)
    bars.set_xticks(range(len(buckets)), names, rotation=20, fontsize=8)
    bars.set(xlabel="|Stockfish eval| (pawns)", ylabel="mean |error| (pawns)")
    bars.set_title("error by |eval| (bar: positions)", y=1.0)
    save_figure(fig, path)


def draw_reconstructions(path: Path, boards: np.ndarray, reconstructions: np.ndarray, per_row: int = 4) -> None:
    """Pairs of 8x8 boards (square tokens, a1 = 0): the test board, then its reconstruction with each wrongly
    reconstructed square outlined in red and the count in its title."""
    rows = math.ceil(len(boards) / per_row)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * per_row, 1.75 * rows))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.3)
    axes = fig.subplots(rows, 2 * per_row, squeeze=False).flatten()
    for ax in axes:
        ax.set_axis_off()
    for i, (board, recon) in enumerate(zip(boards, reconstructions)):
        wrong = board != recon
        draw_board(axes[2 * i], board, None, f"test board {i + 1}")
        draw_board(axes[2 * i + 1], recon, wrong, f"reconstructed: {int(wrong.sum())} wrong")
    save_figure(fig, path)


def draw_board(ax, tokens: np.ndarray, wrong: np.ndarray | None, title: str) -> None:
    shades = (np.add.outer(np.arange(8), np.arange(8)) % 2).astype(float)  # rank + file: a1 is dark
    ax.imshow(shades, cmap="Greys", vmin=-1.5, vmax=3, origin="lower", extent=(0, 8, 0, 8))  # light greys
    for square, token in enumerate(tokens):
        rank, file = divmod(square, 8)
        if token:
            ax.text(file + 0.5, rank + 0.5, PIECE_GLYPHS[token], ha="center", va="center", fontsize=12)
        if wrong is not None and wrong[square]:
            ax.add_patch(_square_outline(file, rank))
    ax.set_title(title, fontsize=8, color="red" if wrong is not None and wrong.any() else "black", y=1.0)
    ax.set_axis_off()


def _square_outline(file: int, rank: int):
    from matplotlib.patches import Rectangle

    return Rectangle((file + 0.06, rank + 0.06), 0.88, 0.88, fill=False, edgecolor="red", linewidth=1.5)
