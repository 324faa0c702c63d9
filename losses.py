"""Losses and metrics.

Chess: L1 on the clamped eval in pawns (the reference setup). Validation metrics are accumulated as
sums in one device tensor, reduced over ranks once, and turned into numbers once per validation.
"""

import torch
import torch.nn.functional as F

from encoding import material_balance

SIGN_MARGIN = 1.0  # sign accuracy counts positions whose |eval| exceeds this many pawns
EVAL_SUM_FIELDS = ("count", "abs_err", "sq_err", "sign_count", "sign_correct", "baseline_abs_err")


def eval_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(prediction.float(), target)


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
