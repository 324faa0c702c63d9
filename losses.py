"""Losses and metrics.

Chess: L1 on the clamped eval in pawns (the reference setup), or BCE on the win probability.
Metrics are always in pawns (a win-probability logit converts back). They are accumulated as
sums in one device tensor, reduced over ranks once, and turned into numbers once per validation.

dVAE: quantisers (Gumbel-softmax, straight-through, ReinMax, softmax), the reconstruction
cross-entropy, the KL to the uniform prior and its beta-TCVAE decomposition.
"""

import math

import torch
import torch.nn.functional as F

from chessdata.encoding import material_balance

WIN_PROB_SCALE_CP = 1 / 0.00368208  # lichess: win probability = sigmoid(cp / 271.6)
TARGETS = ("pawns", "win_prob")
SIGN_MARGIN = 1.0  # sign accuracy counts positions whose |eval| exceeds this many pawns
EVAL_SUM_FIELDS = ("count", "abs_err", "sq_err", "sign_count", "sign_correct", "baseline_abs_err")


def to_pawns(output: torch.Tensor, target: str) -> torch.Tensor:
    """The network's output in pawns: itself (pawns target) or its logit x 271.6 cp (win_prob target)."""
    return output.float() if target == "pawns" else output.float() * (WIN_PROB_SCALE_CP / 100)


def eval_loss(output: torch.Tensor, target_pawns: torch.Tensor, target: str = "pawns") -> torch.Tensor:
    """pawns: L1 on the clamped eval. win_prob: BCE of the output (a logit) against lichess's win
    probability of the clamped eval (so a mate counts as the clamp: 99.6 % at +-15 pawns)."""
    if target == "pawns":
        return F.l1_loss(output.float(), target_pawns)
    win = torch.sigmoid(target_pawns * (100 / WIN_PROB_SCALE_CP))
    return F.binary_cross_entropy_with_logits(output.float(), win)


def eval_metric_sums(
    prediction: torch.Tensor, target: torch.Tensor, packed: torch.Tensor, clamp: float
) -> torch.Tensor:
    """Per-batch sums (see EVAL_SUM_FIELDS) for L1, RMSE, sign accuracy and the material baseline."""
    prediction = prediction.float()
    error = prediction - target
    decided = target.abs() > SIGN_MARGIN
    baseline = material_balance(packed).clamp(-clamp, clamp)
    return torch.stack(
        [
            torch.tensor(float(target.numel()), device=target.device),
            error.abs().sum(),
            error.square().sum(),
            decided.sum().float(),
            (decided & (torch.sign(prediction) == torch.sign(target))).sum().float(),
            (baseline - target).abs().sum(),
        ]
    )


def eval_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Turn summed fields into metrics (pawns). One host transfer."""
    s = dict(zip(EVAL_SUM_FIELDS, sums.double().tolist()))
    n = max(s["count"], 1.0)
    return {
        "l1": s["abs_err"] / n,
        "rmse": (s["sq_err"] / n) ** 0.5,
        "sign_acc": s["sign_correct"] / max(s["sign_count"], 1.0),
        "material_l1": s["baseline_abs_err"] / n,
        "positions": s["count"],
    }


# ---------------------------------------------------------------- dVAE: quantisation

QUANTIZERS = ("gumbel", "reinmax", "softmax")


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """The forward value of `hard`, the gradient of `soft`."""
    return hard + soft - soft.detach()


def reinmax(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ReinMax (Liu et al. 2023, Algorithm 2): a one-hot sample D of softmax(logits) in the forward
    pass, a second-order (Heun) gradient estimate in the backward pass. Returns (output, D).
    Note the sign in the pi1 line: softmax(stopgrad(ln pi1 - theta) + theta) has the value pi1 and
    the softmax Jacobian at pi1; writing `- theta` outside the stopgrad flips the gradient."""
    pi0 = logits.softmax(-1)
    sample = (
        F.one_hot(torch.multinomial(pi0.detach().reshape(-1, pi0.shape[-1]), 1).squeeze(-1), pi0.shape[-1])
        .reshape(pi0.shape)
        .to(pi0.dtype)
    )
    pi1 = (sample + (logits / tau).softmax(-1)) / 2
    pi1 = ((pi1.log() - logits).detach() + logits).softmax(-1)
    pi2 = 2 * pi1 - pi0 / 2
    return pi2 - pi2.detach() + sample, sample


def quantize(logits: torch.Tensor, mode: str, tau: float, hardness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes for the decoder from (B, latents, C) logits, and the one-hot sample they stand for.

    Each mode makes a soft code and a hard one (one-hot forward value, a gradient estimate backward):
      gumbel   soft = softmax((logits + Gumbel noise) / tau), hard = its argmax, straight-through
      reinmax  soft = softmax(logits / tau), hard = ReinMax's sample (tau is clamped to >= 1, as the authors require)
      softmax  soft = softmax(logits / tau), hard = argmax of the logits, straight-through (no noise)
    `hardness` in [0, 1] blends them: 0 = soft, 1 = hard."""
    if mode == "gumbel":
        gumbels = -torch.empty_like(logits).exponential_().log()
        soft = ((logits + gumbels) / tau).softmax(-1)
        sample = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
        hard = straight_through(sample, soft)
    elif mode == "reinmax":
        tau = max(tau, 1.0)
        soft = (logits / tau).softmax(-1)
        hard, sample = reinmax(logits, tau)
    elif mode == "softmax":
        soft = (logits / tau).softmax(-1)
        sample = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(soft.dtype)
        hard = straight_through(sample, soft)
    else:
        raise ValueError(f"quantizer: expected one of {', '.join(QUANTIZERS)}, got {mode!r}")
    if hardness <= 0:
        return soft, sample
    if hardness >= 1:
        return hard, sample
    return torch.lerp(soft, hard, hardness), sample


# ---------------------------------------------------------------- dVAE: losses


def reconstruction_loss(
    token_logits: torch.Tensor,
    tokens: torch.Tensor,
    focal_gamma: float = 0.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over the 64 squares, mean over squares and boards. focal_gamma > 0 scales each
    square's loss by (1 - p_true)^gamma (Lin et al. 2017), so the rare pieces count over the many
    easy empty squares; class_weights weighs each of the 13 tokens."""
    logp = token_logits.float().log_softmax(-1)
    logp_true = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    loss = -logp_true
    if focal_gamma:
        loss = loss * (1 - logp_true.exp()).pow(focal_gamma)
    if class_weights is not None:
        loss = loss * class_weights[tokens]
    return loss.mean()


def kl_uniform(code_logits: torch.Tensor) -> torch.Tensor:
    """KL of each latent's posterior q to the uniform prior over C codes, sum_c q (log q + log C),
    averaged over latents and batch (nats)."""
    logq = code_logits.float().log_softmax(-1)
    return (logq.exp() * (logq + math.log(code_logits.shape[-1]))).sum(-1).mean()


def tcvae_terms(code_logits: torch.Tensor, sample: torch.Tensor, dataset_size: int) -> dict[str, torch.Tensor]:
    """beta-TCVAE's split of the KL (Chen et al. 2018) into index-code mutual information, total
    correlation and dimension-wise KL, estimated on the batch with minibatch-weighted sampling.

    For each sample z_i (one code per latent) and every posterior q(.|x_j) of the batch:
      log q(z_i)          ~ logsumexp_j [log w_ij + sum_l log q(z_il | x_j)]
      log prod_l q(z_il)  ~ sum_l logsumexp_j [log w_ij + log q(z_il | x_j)]
    The weights are those of a batch drawn from a dataset of N positions: w_ii = 1/N for the sample's
    own posterior, (N-1)/(N(M-1)) for the M-1 others, so they sum to 1. (A flat 1/(NM) for every j,
    as sometimes written, leaves an offset of (L-1) log N in the TC: never zero even for independent
    latents.) Then, averaged over i:
      MI = log q(z|x) - log q(z),  TC = log q(z) - sum_l log q(z_l),  DWKL = sum_l (log q(z_l) + log C)
    and MI + TC + DWKL = log q(z|x) + L log C, the sampled KL to the uniform prior summed over latents."""
    batch, latents, codes = code_logits.shape
    logq = code_logits.float().log_softmax(-1)  # (M, L, C): log q(c | x_j) per latent
    pairs = torch.einsum("ilc,jlc->ijl", sample.float(), logq)  # log q(z_il | x_j)
    n = max(dataset_size, batch)
    others = math.log((n - 1) / (n * (batch - 1))) if batch > 1 else 0.0
    log_w = torch.full((batch, batch), others, device=logq.device)
    log_w.fill_diagonal_(-math.log(n) if batch > 1 else 0.0)
    log_q_z_given_x = pairs.diagonal(dim1=0, dim2=1).sum(0)  # (M,)
    log_q_z = torch.logsumexp(log_w + pairs.sum(-1), dim=1)
    log_q_marginals = torch.logsumexp(log_w[:, :, None] + pairs, dim=1)  # (M, L)
    return {
        "mi": (log_q_z_given_x - log_q_z).mean(),
        "tc": (log_q_z - log_q_marginals.sum(-1)).mean(),
        "dwkl": (log_q_marginals + math.log(codes)).sum(-1).mean(),
    }


DVAE_SUM_FIELDS = ("boards", "squares_correct", "boards_correct", "recon_loss", "kl")


def dvae_metric_sums(token_logits: torch.Tensor, tokens: torch.Tensor, code_logits: torch.Tensor) -> torch.Tensor:
    """Per-batch sums (see DVAE_SUM_FIELDS) for token and board accuracy, reconstruction and KL."""
    batch = tokens.shape[0]
    if batch == 0:  # a rank's last evaluation batch may be empty (data.EpochBatches); a mean of none is NaN
        return torch.zeros(len(DVAE_SUM_FIELDS), device=tokens.device)
    correct = token_logits.argmax(-1) == tokens
    return torch.stack(
        [
            torch.tensor(float(batch), device=tokens.device),
            correct.sum().float(),
            correct.all(-1).sum().float(),
            reconstruction_loss(token_logits, tokens) * batch,
            kl_uniform(code_logits) * batch,
        ]
    )


def dvae_metrics(sums: torch.Tensor, code_counts: torch.Tensor) -> dict[str, float]:
    """Metrics from summed fields and the (latents, C) count of argmax codes over the split."""
    s = dict(zip(DVAE_SUM_FIELDS, sums.double().tolist()))
    n = max(s["boards"], 1.0)
    usage = code_counts.double().sum(0)
    p = usage / usage.sum().clamp(min=1)
    entropy = -(p * p.clamp(min=1e-30).log()).sum()
    return {
        "token_acc": s["squares_correct"] / (64 * n),
        "board_acc": s["boards_correct"] / n,
        "recon_loss": s["recon_loss"] / n,
        "kl": s["kl"] / n,
        "perplexity": float(entropy.exp()),
        "codes_used": int((usage > 0).sum()),
        "boards": s["boards"],
    }
