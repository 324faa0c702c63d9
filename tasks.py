"""The two built-in tasks, both on the prepared lichess positions (chessdata/): each is a config class
and a config.Task bundle of plain functions; the loop in train.py is the same for all.

  chess  packed rows -> MLP -> eval in pawns; L1 (or BCE on the win probability)
  dvae   packed rows -> 64 square tokens -> encoder -> N codes -> decoder -> 64 tokens; cross-entropy + KL

A batch is (packed 101-byte rows, evals in pawns) for chess and (packed rows,) for the dVAE. A third
task needs no entry here: a file like examples/charlm.py is run directly (see the README).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

import callbacks
import figures
import losses
from chessdata.encoding import board_tokens, random_flip, row_to_fen
from chessdata.folder import SPLITS, eval_target, load_split
from chessdata.prepare import ensure_prepared
from config import CheckpointConfig, DataConfig, LogConfig, RunConfig, ScheduleConfig, Task, TrainConfig, require
from data import ArrayDataset
from model import MASK_TOKEN, ChessEvaluator, DiscreteVAE
from schedules import RAMP_SHAPES, ramp
from storage import write_atomic

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


@dataclass
class DVAEModelConfig:
    """The discrete VAE (model.DiscreteVAE): MLP-mixer encoder, latent queries, codebook, MLP-mixer decoder."""

    latents: int = 32
    """Latent positions N (each one code)."""
    codebook: int = 64
    """Codebook entries C (shared by all latents)."""
    width: int = 32
    """Channels per square and per latent."""
    depth: int = 2
    """Mixer blocks over the 64 squares in the encoder and in the decoder."""


@dataclass
class Ramp:
    """A scheduled value (schedules.ramp): `start` for `hold` steps, then to `end` over `steps` steps."""

    start: float = 0.0
    """The value held first."""
    end: float = 0.0
    """The value reached after hold + steps optimizer steps."""
    hold: int = 0
    """Optimizer steps at `start` before moving."""
    steps: int = 0
    """Optimizer steps of the move."""
    shape: Literal["constant", "linear", "exponential", "cosine", "threshold"] = "constant"
    """constant (always start), linear, exponential, cosine or threshold."""


@dataclass
class DVAELossConfig:
    """Quantisation, the loss terms and the values scheduled by step (all logged at each log interval)."""

    quantizer: Literal["gumbel", "reinmax", "softmax"] = "gumbel"
    """gumbel (Gumbel-softmax), reinmax (Liu et al. 2023; tau clamped to >= 1) or softmax (no noise)."""
    tau: Ramp = field(default_factory=lambda: Ramp(1.0, 1 / 16, 0, 4000, "cosine"))
    """Temperature of the soft codes (DALL-E: 1 to 1/16, cosine, over 150k steps)."""
    hardness: Ramp = field(default_factory=lambda: Ramp(1.0, 1.0, 0, 0, "constant"))
    """Blend of soft (0) and straight-through hard (1) codes in training; evaluation always uses the argmax code."""
    kl_weight: Ramp = field(default_factory=lambda: Ramp(0.0, 0.01, 0, 1000, "linear"))
    """Weight of the KL to the uniform prior (or of the TCVAE terms), warmed up from 0."""
    mask: Ramp = field(default_factory=lambda: Ramp(0.0, 0.0, 0, 0, "constant"))
    """Largest fraction of squares replaced by a MASK token per training batch (the fraction is drawn from
    U(0, value)); never at validation or test."""
    tcvae: bool = False
    """Replace the KL by beta-TCVAE's terms: mi_weight*MI + tc_weight*TC + dwkl_weight*DWKL (x kl_weight)."""
    mi_weight: float = 1.0
    """beta-TCVAE: weight of the index-code mutual information."""
    tc_weight: float = 6.0
    """beta-TCVAE: weight of the total correlation (the paper's beta)."""
    dwkl_weight: float = 1.0
    """beta-TCVAE: weight of the dimension-wise KL."""
    focal_gamma: float = 0.0
    """Focal modulation of the reconstruction cross-entropy; 0 = plain cross-entropy."""
    class_weights: list[float] | None = None
    """13 weights (empty, K Q R B N P k q r b n p) for the reconstruction loss; unset = all 1."""


@dataclass
class DVAEConfig(RunConfig):
    """Train the discrete VAE: boards as 64 square tokens -> N discrete codes -> the 64 tokens again."""

    model: DVAEModelConfig = field(default_factory=DVAEModelConfig)
    dvae: DVAELossConfig = field(default_factory=DVAELossConfig)
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(kind="noam", warmup_steps=300, noam_scale=0.2, noam_d_model=32)
    )
    data: PositionsData = field(default_factory=lambda: PositionsData(batch_size=128))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=5000, val_every=1000))
    task: tyro.conf.Suppress[str] = "dvae"


# ---------------------------------------------------------------- data


def prepare_positions(cfg: RunConfig) -> None:
    ensure_prepared(cfg.data.sources, cfg.data.dir)


def chess_datasets(cfg: ChessConfig) -> dict[str, ArrayDataset]:
    """Each split as (packed rows, clamped pawns): one memmap gather a batch; bits are unpacked on the device."""
    splits = {split: load_split(cfg.data.dir, split) for split in SPLITS}
    return {
        split: ArrayDataset(a["positions"], eval_target(np.asarray(a["cp"]), np.asarray(a["mate"]), cfg.data.clamp))
        for split, a in splits.items()
    }


def board_datasets(cfg: DVAEConfig) -> dict[str, ArrayDataset]:
    return {split: ArrayDataset(load_split(cfg.data.dir, split)["positions"]) for split in SPLITS}


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


# ---------------------------------------------------------------- discrete VAE


def dvae_model(cfg: DVAEConfig) -> torch.nn.Module:
    m = cfg.model
    return DiscreteVAE(m.latents, m.codebook, m.width, m.depth)


def dvae_scheduled(cfg: DVAEConfig, step: int) -> dict[str, float]:
    """kl_weight, tau, hardness and the largest mask fraction at `step`: functions of the step alone."""
    d = cfg.dvae
    return {
        name: ramp(step, r.start, r.end, r.hold, r.steps, r.shape)
        for name, r in (("kl_weight", d.kl_weight), ("tau", d.tau), ("hardness", d.hardness), ("mask", d.mask))
    }


def mask_squares(tokens: torch.Tensor, max_fraction: float) -> torch.Tensor:
    """Replace a fraction f ~ U(0, max_fraction) of the squares (drawn per batch) by MASK_TOKEN."""
    if max_fraction <= 0:
        return tokens
    fraction = torch.rand((), device=tokens.device) * max_fraction
    return tokens.masked_fill(torch.rand(tokens.shape, device=tokens.device) < fraction, MASK_TOKEN)


DVAE_FIELDS = ("loss", "recon_loss", "kl", "mi", "tc", "dwkl")


def dvae_step(cfg: DVAEConfig, model, batch, step: int, train_size: int):
    """Encode (the input masked), quantise with this step's tau and hardness, decode, and score the
    reconstruction of the unmasked board. KL or the TCVAE terms are weighted by kl_weight."""
    d = cfg.dvae
    values = dvae_scheduled(cfg, step)
    tokens = board_tokens(batch[0])
    token_logits, code_logits, sample = model(
        mask_squares(tokens, values["mask"]),
        lambda logits: losses.quantize(logits, d.quantizer, values["tau"], values["hardness"]),
    )
    weights = None if d.class_weights is None else torch.tensor(d.class_weights, device=tokens.device)
    recon = losses.reconstruction_loss(token_logits, tokens, d.focal_gamma, weights)
    kl = losses.kl_uniform(code_logits)
    with torch.set_grad_enabled(d.tcvae and torch.is_grad_enabled()):
        terms = losses.tcvae_terms(code_logits, sample, train_size)
    if d.tcvae:
        prior = d.mi_weight * terms["mi"] + d.tc_weight * terms["tc"] + d.dwkl_weight * terms["dwkl"]
    else:
        prior = kl
    loss = recon + values["kl_weight"] * prior
    logged = torch.stack([loss, recon, kl, terms["mi"], terms["tc"], terms["dwkl"]]).detach()
    return loss, logged


def dvae_eval_step(cfg: DVAEConfig, model, batch) -> dict:
    """Deterministic reconstruction through the argmax codes, no masking: this batch's sums and its count of each
    latent's codes (the trainer adds them up over the split and the ranks)."""
    tokens = board_tokens(batch[0])
    token_logits, code_logits, codes = model(tokens)
    index = codes.argmax(-1)
    counts = torch.zeros(cfg.model.latents, cfg.model.codebook, device=index.device, dtype=torch.float64)
    counts.scatter_add_(1, index.T, torch.ones(index.T.shape, device=counts.device, dtype=counts.dtype))
    return {"sums": losses.dvae_metric_sums(token_logits, tokens, code_logits), "code_counts": counts}


def dvae_eval_metrics(cfg: DVAEConfig, summed: dict) -> tuple[dict, dict]:
    """Token and board accuracy, reconstruction loss, KL, codebook perplexity and use, and a code-usage histogram
    per latent."""
    counts = summed["code_counts"]
    metrics = losses.dvae_metrics(summed["sums"], counts)
    edges = torch.arange(cfg.model.codebook + 1, dtype=torch.float64).numpy()
    histograms = {}
    for latent, row in enumerate(counts):
        codes = torch.arange(cfg.model.codebook, dtype=torch.float64)
        mean = float((row * codes).sum() / row.sum().clamp(min=1))
        std = float(((row * (codes - mean) ** 2).sum() / row.sum().clamp(min=1)).sqrt())
        histograms[f"val/code_usage/latent_{latent:02d}"] = (row.numpy(), edges, mean, std)
    return {**metrics, "loss": metrics["recon_loss"]}, histograms


def dvae_report(cfg: DVAEConfig, metrics: dict) -> tuple[str, dict]:
    return (
        f"{int(metrics['boards'])} boards; {cfg.model.latents} latents x {cfg.model.codebook} codes",
        {
            "token_acc": metrics["token_acc"],
            "board_acc": metrics["board_acc"],
            "recon_loss": metrics["recon_loss"],
            "kl": metrics["kl"],
            "perplexity": metrics["perplexity"],
            "codes_used": metrics["codes_used"],
        },
    )


def dvae_test_pictures(cfg: DVAEConfig, datasets: dict) -> dict:
    """After the test, test_reconstructions.png: 8 test boards spread over the split beside the tested model's
    reconstructions (through the argmax codes, as the test scores them), the wrong squares marked."""
    test = datasets["test"]
    index = figures.spread(len(test), 8)

    def draw(run) -> None:
        tokens = board_tokens(torch.from_numpy(np.asarray(test.arrays[0][index]))).numpy()
        recon = figures.predict(run.model, tokens, run.fabric.device, len(tokens) or 1, lambda out: out[0].argmax(-1))
        figures.publish(
            run,
            run.run_dir / "test_reconstructions.png",
            "test/reconstructions",
            lambda path: figures.draw_reconstructions(path, tokens, recon.astype(np.int64)),
        )

    return {"on_test_end": [draw]}


def check_dvae(cfg: DVAEConfig) -> None:
    m, d = cfg.model, cfg.dvae
    for name in ("latents", "codebook", "width"):
        require(getattr(m, name) >= 1, f"model.{name}", "a count >= 1", getattr(m, name))
    require(m.depth >= 0, "model.depth", "a count >= 0", m.depth)
    quantizers = ("gumbel", "reinmax", "softmax")
    require(d.quantizer in quantizers, "dvae.quantizer", "one of " + ", ".join(quantizers), d.quantizer)
    for name in ("tau", "hardness", "kl_weight", "mask"):
        r = getattr(d, name)
        require(r.shape in RAMP_SHAPES, f"dvae.{name}.shape", "one of " + ", ".join(RAMP_SHAPES), r.shape)
        require(r.hold >= 0 and r.steps >= 0, f"dvae.{name}.hold/steps", "counts >= 0", (r.hold, r.steps))
        one_sign = r.shape != "exponential" or r.start * r.end > 0
        require(one_sign, f"dvae.{name}.start/end", "non-zero values of one sign for an exponential ramp",
                (r.start, r.end))  # fmt: skip
    require(min(d.tau.start, d.tau.end) > 0, "dvae.tau.start/end", "positive temperatures", (d.tau.start, d.tau.end))
    for name, allowed in (("hardness", "values in [0, 1]"), ("mask", "fractions in [0, 1]")):
        r = getattr(d, name)
        require(0 <= r.start <= 1 and 0 <= r.end <= 1, f"dvae.{name}.start/end", allowed, (r.start, r.end))
    kl = d.kl_weight
    require(min(kl.start, kl.end) >= 0, "dvae.kl_weight.start/end", "weights >= 0", (kl.start, kl.end))
    require(d.focal_gamma >= 0, "dvae.focal_gamma", "a number >= 0", d.focal_gamma)
    weights_ok = d.class_weights is None or (len(d.class_weights) == 13 and min(d.class_weights) >= 0)
    require(weights_ok, "dvae.class_weights", "13 weights >= 0 (empty, K Q R B N P k q r b n p)", d.class_weights)


DVAE = Task(
    "dvae",
    DVAEConfig,
    dvae_model,
    board_datasets,
    dvae_step,
    eval_step=dvae_eval_step,
    eval_metrics=dvae_eval_metrics,
    report=dvae_report,
    metrics={
        "val/token_acc": "max",
        "val/board_acc": "max",
        "val/recon_loss": "min",
        "val/kl": "min",
        "val/loss": "min",
    },
    train_fields=DVAE_FIELDS,
    scheduled=dvae_scheduled,
    prepare_data=prepare_positions,
    hooks=dvae_test_pictures,
    check=check_dvae,
    blocks=DiscreteVAE.block_types,
)

TASKS = {"chess": CHESS, "dvae": DVAE}
"""The tasks `python train.py NAME` runs; the first is the default."""
