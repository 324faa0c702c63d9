"""What differs between the tasks; the loop in train.py is the same for all.

A Task is a bundle of plain functions (no base class): build the model, the loss of one training
micro-batch, the values scheduled by step, and evaluation over a split. Both tasks read the same
prepared position shards: a batch is (packed 101-byte rows, evals in pawns).

  chess  packed rows -> MLP -> eval in pawns; L1 (or BCE on the win probability)
  dvae   packed rows -> 64 square tokens -> encoder -> N codes -> decoder -> 64 tokens; cross-entropy + KL
"""

from dataclasses import dataclass
from typing import Callable

import torch

import losses
from config import ChessConfig, DVAEConfig, RunConfig
from encoding import board_tokens, random_flip
from model import MASK_TOKEN, ChessEvaluator, DiscreteVAE
from schedules import ramp


@dataclass(frozen=True)
class Task:
    name: str
    config: type
    build_model: Callable[[RunConfig], torch.nn.Module]
    train_fields: tuple[str, ...]
    """What `train_step` returns, averaged over each log interval; the first is the loss."""
    train_step: Callable
    """(cfg, model, batch, step, dataset_size) -> (loss to backpropagate, detached values of train_fields)."""
    scheduled: Callable[[RunConfig, int], dict[str, float]]
    """The values the task's schedules apply at an optimizer step (logged)."""
    evaluate: Callable
    """(fabric, cfg, model, loader) -> (metrics incl. "loss", histograms for the loggers)."""
    report: Callable[[RunConfig, dict], tuple[str, dict]]
    """The test table: its title and rows."""
    blocks: tuple[type, ...] = ()
    """The model's repeated blocks: FSDP wraps (shards) each one separately."""


# ---------------------------------------------------------------- chess


def chess_model(cfg: ChessConfig) -> torch.nn.Module:
    return ChessEvaluator(cfg.model.width, cfg.model.depth)


def chess_step(cfg: ChessConfig, model, batch, step: int, dataset_size: int):
    packed, pawns = batch
    if cfg.data.flip:
        packed, pawns = random_flip(packed, pawns)
    loss = losses.eval_loss(model(packed), pawns, cfg.data.target)
    return loss, loss.detach()  # adds onto the one-field loss_sum


@torch.no_grad()
def chess_evaluate(fabric, cfg: ChessConfig, model, loader) -> tuple[dict, dict]:
    """Metrics over a whole split, summed on each rank's device and reduced over ranks once."""
    model.eval()
    sums = torch.zeros(len(losses.EVAL_SUM_FIELDS), device=fabric.device, dtype=torch.float64)
    loader.sampler.start_epoch(0)
    for packed, pawns in loader:
        output = losses.to_pawns(model(packed), cfg.data.target)
        sums += losses.eval_metric_sums(output, pawns, packed, cfg.data.clamp).double()
    model.train()
    metrics = losses.eval_metrics(fabric.all_reduce(sums, reduce_op="sum"))
    return {**metrics, "loss": metrics["l1"]}, {}


def chess_report(cfg: ChessConfig, metrics: dict) -> tuple[str, dict]:
    return (f"{int(metrics['positions'])} positions; pawns, clamped to +-{cfg.data.clamp:g}",
            {"l1": metrics["l1"], "rmse": metrics["rmse"], "sign_acc (|eval|>1)": metrics["sign_acc"],
             "material baseline l1": metrics["material_l1"]})


CHESS = Task("chess", ChessConfig, chess_model, ("loss",), chess_step, lambda cfg, step: {}, chess_evaluate,
             chess_report, ChessEvaluator.block_types)


# ---------------------------------------------------------------- discrete VAE


def dvae_model(cfg: DVAEConfig) -> torch.nn.Module:
    m = cfg.model
    return DiscreteVAE(m.latents, m.codebook, m.width, m.depth)


def dvae_scheduled(cfg: DVAEConfig, step: int) -> dict[str, float]:
    """kl_weight, tau, hardness and the largest mask fraction at `step`: functions of the step alone."""
    d = cfg.dvae
    return {name: ramp(step, r.start, r.end, r.hold, r.steps, r.shape)
            for name, r in (("kl_weight", d.kl_weight), ("tau", d.tau), ("hardness", d.hardness), ("mask", d.mask))}


def mask_squares(tokens: torch.Tensor, max_fraction: float) -> torch.Tensor:
    """Replace a fraction f ~ U(0, max_fraction) of the squares (drawn per batch) by MASK_TOKEN."""
    if max_fraction <= 0:
        return tokens
    fraction = torch.rand((), device=tokens.device) * max_fraction
    return tokens.masked_fill(torch.rand(tokens.shape, device=tokens.device) < fraction, MASK_TOKEN)


DVAE_FIELDS = ("loss", "recon_loss", "kl", "mi", "tc", "dwkl")


def dvae_step(cfg: DVAEConfig, model, batch, step: int, dataset_size: int):
    """Encode (the input masked), quantise with this step's tau and hardness, decode, and score the
    reconstruction of the unmasked board. KL or the TCVAE terms are weighted by kl_weight."""
    d = cfg.dvae
    values = dvae_scheduled(cfg, step)
    tokens = board_tokens(batch[0])
    token_logits, code_logits, sample = model(
        mask_squares(tokens, values["mask"]),
        lambda logits: losses.quantize(logits, d.quantizer, values["tau"], values["hardness"]))
    weights = None if d.class_weights is None else torch.tensor(d.class_weights, device=tokens.device)
    recon = losses.reconstruction_loss(token_logits, tokens, d.focal_gamma, weights)
    kl = losses.kl_uniform(code_logits)
    with torch.set_grad_enabled(d.tcvae and torch.is_grad_enabled()):
        terms = losses.tcvae_terms(code_logits, sample, dataset_size)
    if d.tcvae:
        prior = d.mi_weight * terms["mi"] + d.tc_weight * terms["tc"] + d.dwkl_weight * terms["dwkl"]
    else:
        prior = kl
    loss = recon + values["kl_weight"] * prior
    logged = torch.stack([loss, recon, kl, terms["mi"], terms["tc"], terms["dwkl"]]).detach()
    return loss, logged


@torch.no_grad()
def dvae_evaluate(fabric, cfg: DVAEConfig, model, loader) -> tuple[dict, dict]:
    """Deterministic reconstruction through the argmax codes, no masking: token and board accuracy,
    reconstruction loss, KL, codebook perplexity and use, and a code-usage histogram per latent."""
    model.eval()
    sums = torch.zeros(len(losses.DVAE_SUM_FIELDS), device=fabric.device, dtype=torch.float64)
    counts = torch.zeros(cfg.model.latents, cfg.model.codebook, device=fabric.device, dtype=torch.float64)
    loader.sampler.start_epoch(0)
    for packed, _ in loader:
        tokens = board_tokens(packed)
        token_logits, code_logits, codes = model(tokens)
        index = codes.argmax(-1)
        sums += losses.dvae_metric_sums(token_logits, tokens, code_logits).double()
        counts.scatter_add_(1, index.T, torch.ones(index.T.shape, device=counts.device, dtype=counts.dtype))
    model.train()
    sums = fabric.all_reduce(sums, reduce_op="sum")
    counts = fabric.all_reduce(counts, reduce_op="sum").cpu()
    metrics = losses.dvae_metrics(sums, counts)
    edges = torch.arange(cfg.model.codebook + 1, dtype=torch.float64).numpy()
    histograms = {}
    for latent, row in enumerate(counts):
        codes = torch.arange(cfg.model.codebook, dtype=torch.float64)
        mean = float((row * codes).sum() / row.sum().clamp(min=1))
        std = float(((row * (codes - mean) ** 2).sum() / row.sum().clamp(min=1)).sqrt())
        histograms[f"val/code_usage/latent_{latent:02d}"] = (row.numpy(), edges, mean, std)
    return {**metrics, "loss": metrics["recon_loss"]}, histograms


def dvae_report(cfg: DVAEConfig, metrics: dict) -> tuple[str, dict]:
    return (f"{int(metrics['boards'])} boards; {cfg.model.latents} latents x {cfg.model.codebook} codes",
            {"token_acc": metrics["token_acc"], "board_acc": metrics["board_acc"],
             "recon_loss": metrics["recon_loss"], "kl": metrics["kl"], "perplexity": metrics["perplexity"],
             "codes_used": metrics["codes_used"]})


DVAE = Task("dvae", DVAEConfig, dvae_model, DVAE_FIELDS, dvae_step, dvae_scheduled, dvae_evaluate, dvae_report,
            DiscreteVAE.block_types)

TASKS = {"chess": CHESS, "dvae": DVAE}
