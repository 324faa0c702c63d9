"""The discrete VAE of boards, on the same prepared positions as the chess evaluator: packed rows -> 64 square
tokens -> encoder -> N codes -> decoder -> 64 tokens; cross-entropy + KL. A batch is (packed rows,).
"""

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import tyro

import losses
from chessdata.encoding import board_tokens
from chessdata.folder import SPLITS, load_split
from config import CheckpointConfig, RunConfig, ScheduleConfig, Task, TrainConfig, require
from data import ArrayDataset
from model import MASK_TOKEN, DiscreteVAE
from schedules import RAMP_SHAPES, ramp
from tasks import figures
from tasks.chess import PositionsData, prepare_positions

# ---------------------------------------------------------------- configs


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


def board_datasets(cfg: DVAEConfig) -> dict[str, ArrayDataset]:
    return {split: ArrayDataset(load_split(cfg.data.dir, split)["positions"]) for split in SPLITS}


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
    return loss, {"recon_loss": recon, "kl": kl, "mi": terms["mi"], "tc": terms["tc"], "dwkl": terms["dwkl"]}


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
        if not run.cfg.log.pictures:
            return
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
        require(
            one_sign, f"dvae.{name}.start/end", "non-zero values of one sign for an exponential ramp", (r.start, r.end)
        )
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
    scheduled=dvae_scheduled,
    prepare_data=prepare_positions,
    hooks=dvae_test_pictures,
    check=check_dvae,
    blocks=DiscreteVAE.block_types,
)
