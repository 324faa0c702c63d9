"""The chess evaluator on the prepared lichess positions (chessdata/): packed 101-byte rows -> MLP -> eval in
pawns, L1 on the clamped Stockfish eval (or BCE on the win probability). A batch is (packed rows, evals in pawns).
Its config class and its config.Task bundle of plain functions; the loop in train.py is the same for every task.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

import callbacks
import losses
from chessdata.encoding import random_flip, row_to_fen
from chessdata.folder import SPLITS, eval_target, load_split
from config import DataConfig, LogConfig, RunConfig, ScheduleConfig, Task, require
from data import ArrayDataset
from kibitz.storage import write_atomic
from model import ChessEvaluator
from tasks import figures

# ---------------------------------------------------------------- configs


@dataclass
class PositionsData(DataConfig):
    """Where positions come from and how they are batched."""

    sources: list[Path] = field(default_factory=lambda: [Path("data/sample.pgn.zst")])
    """lichess .pgn / .pgn.zst files; prepared into `dir` on first use (cached after)."""
    dir: Path = Path("data/cache/sample")
    """Prepared data directory (see `python -m chessdata prepare`)."""


@dataclass
class ChessData(PositionsData):
    clamp: float = 15.0
    """Targets are pawns clamped to +-clamp; mate scores map to the clamp with their sign."""
    target: Literal["pawns", "win_prob"] = "pawns"
    """pawns: L1 on the clamped eval (the reference setup); win_prob: BCE on sigmoid(cp / 271.6), lichess's
    win probability."""
    flip: bool = True
    """Augment training batches: colour-mirror a random half of each batch and negate its evals (on the device)."""


@dataclass
class ChessLog(LogConfig):
    predictions: int = 16
    """Validation positions shown with their predictions (and boards) in a table at each validation; 0 = none."""


@dataclass
class ChessModelConfig:
    """The MLP evaluator (model.py)."""

    width: int = 808
    """Width of each hidden layer."""
    depth: int = 4
    """Number of hidden Linear+ReLU blocks."""


@dataclass
class ChessConfig(RunConfig):
    """Train the chess evaluator: an MLP over the 808-bit position, L1 on the Stockfish eval in pawns."""

    model: ChessModelConfig = field(default_factory=ChessModelConfig)
    data: ChessData = field(default_factory=ChessData)
    log: ChessLog = field(default_factory=ChessLog)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(noam_d_model=808))
    task: tyro.conf.Suppress[str] = "chess"


# ---------------------------------------------------------------- data


def prepare_positions(cfg: RunConfig) -> None:
    from chessdata.prepare import ensure_prepared  # the pipeline and python-chess, only when data is missing

    ensure_prepared(cfg.data.sources, cfg.data.dir)


def chess_datasets(cfg: ChessConfig) -> dict[str, ArrayDataset]:
    """Each split as (packed rows, clamped pawns): one memmap gather a batch; bits are unpacked on the device."""
    splits = {split: load_split(cfg.data.dir, split) for split in SPLITS}
    return {
        split: ArrayDataset(a["positions"], eval_target(np.asarray(a["cp"]), np.asarray(a["mate"]), cfg.data.clamp))
        for split, a in splits.items()
    }


# ---------------------------------------------------------------- chess


def chess_model(cfg: ChessConfig) -> torch.nn.Module:
    return ChessEvaluator(cfg.model.width, cfg.model.depth)


def chess_step(cfg: ChessConfig, model, batch, step: int, train_size: int):
    packed, pawns = batch
    if cfg.data.flip:
        packed, pawns = random_flip(packed, pawns)
    loss = losses.eval_loss(model(packed), pawns, cfg.data.target)
    return loss


def chess_eval_step(cfg: ChessConfig, model, batch) -> dict:
    """This batch's sums (losses.EVAL_SUM_FIELDS); the trainer adds them up over the split and the ranks."""
    packed, pawns = batch
    output = losses.to_pawns(model(packed), cfg.data.target)
    return {"sums": losses.eval_metric_sums(output, pawns, packed, cfg.data.clamp)}


def chess_eval_metrics(cfg: ChessConfig, sums: dict) -> dict:
    metrics = losses.eval_metrics(sums["sums"])
    return {**metrics, "loss": metrics["l1"]}


def chess_report(cfg: ChessConfig, metrics: dict) -> tuple[str, dict]:
    title = f"{int(metrics['positions'])} positions; pawns, clamped to +-{cfg.data.clamp:g}"
    names = {"l1": "l1", "rmse": "rmse", "sign_acc": "sign_acc (|eval|>1)", "material_l1": "material baseline l1"}
    return title, {shown: metrics[name] for name, shown in names.items()}


def predicted_pawns(cfg: ChessConfig, run, positions: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's evals (pawns) of packed positions, in eval mode, on every rank (FSDP gathers from all)."""
    return figures.predict(
        run.model, positions, run.fabric.device, batch_size, lambda out: losses.to_pawns(out, cfg.data.target)
    )


def prediction_table(cfg: ChessConfig, datasets: dict) -> dict:
    """At every validation, rank 0 logs the same `log.predictions` validation positions: FEN, target,
    prediction (pawns) and the board drawn by python-chess."""
    import chess
    import chess.svg

    count = cfg.log.predictions
    if not count or "none" in cfg.log.logger:
        return {}
    positions, targets = (np.array(a[:count]) for a in datasets["val"].arrays)
    fens = [row_to_fen(row) for row in positions]
    boards = [chess.svg.board(chess.Board(fen), size=160) for fen in fens]

    def log(run) -> None:
        predictions = predicted_pawns(cfg, run, positions, len(positions)).tolist()
        if run.loggers is not None:
            table = [list(row) for row in zip(fens, targets.tolist(), predictions, boards)]
            run.loggers.log_table("val/predictions", ["fen", "target", "prediction", "board"], table, run.step)

    return {"on_validation_end": [log]}


def chess_test_pictures(cfg: ChessConfig, datasets: dict) -> dict:
    """After the test, test_predictions.png (and test_error_by_eval.json): the tested model's prediction against
    Stockfish on up to 20,000 test positions spread over the split, and the mean error by |eval| bucket."""
    test = datasets["test"]
    index = figures.spread(len(test), 20_000)

    def draw(run) -> None:
        if not run.cfg.log.pictures:
            return
        positions, targets = (np.asarray(a[index]) for a in test.arrays)
        predictions = predicted_pawns(cfg, run, positions, cfg.data.eval_batch_size)

        def picture(path: Path) -> None:
            buckets = figures.error_by_eval(targets, predictions, cfg.data.clamp)
            write_atomic(path.parent / "test_error_by_eval.json", json.dumps(buckets, indent=2))
            figures.draw_predictions(path, targets, predictions, cfg.data.clamp, buckets)

        figures.publish(run, run.run_dir / "test_predictions.png", "test/predictions", picture)

    return {"on_test_end": [draw]}


def chess_hooks(cfg: ChessConfig, datasets: dict) -> dict:
    return callbacks.merge(prediction_table(cfg, datasets), chess_test_pictures(cfg, datasets))


def check_chess(cfg: ChessConfig) -> None:
    m = cfg.model
    require(m.width > 0 and m.depth >= 0, "model.width/depth", "width > 0 and depth >= 0", (m.width, m.depth))
    require(cfg.data.clamp > 0, "data.clamp", "a positive number of pawns", cfg.data.clamp)
    require(cfg.log.predictions >= 0, "log.predictions", "a count >= 0", cfg.log.predictions)


CHESS = Task(
    "chess",
    ChessConfig,
    chess_model,
    chess_datasets,
    chess_step,
    metrics={"val/l1": "min", "val/rmse": "min", "val/sign_acc": "max", "val/loss": "min", "val/material_l1": "min"},
    eval_step=chess_eval_step,
    eval_metrics=chess_eval_metrics,
    report=chess_report,
    prepare_data=prepare_positions,
    hooks=chess_hooks,
    check=check_chess,
    blocks=ChessEvaluator.block_types,
)
