"""Losses and metrics.

Chess: L1 on the clamped eval in pawns (the reference setup), or BCE on the win probability.
Metrics are always in pawns (a win-probability logit converts back). They are accumulated as
sums in one device tensor, reduced over ranks once, and turned into numbers once per validation.
"""

import torch
import torch.nn.functional as F

from encoding import material_balance

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


def eval_metric_sums(prediction: torch.Tensor, target: torch.Tensor, packed: torch.Tensor,
                     clamp: float) -> torch.Tensor:
    """Per-batch sums (see EVAL_SUM_FIELDS) for L1, RMSE, sign accuracy and the material baseline."""
    prediction = prediction.float()
    error = prediction - target
    decided = target.abs() > SIGN_MARGIN
    baseline = material_balance(packed).clamp(-clamp, clamp)
    return torch.stack([
        torch.tensor(float(target.numel()), device=target.device),
        error.abs().sum(),
        error.square().sum(),
        decided.sum().float(),
        (decided & (torch.sign(prediction) == torch.sign(target))).sum().float(),
        (baseline - target).abs().sum(),
    ])


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
