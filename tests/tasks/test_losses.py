import math

import torch

import losses


def test_win_probability_loss_is_minimal_at_lichess_formula():
    cp = torch.tensor([-300.0, -50.0, 0.0, 17.0, 250.0, 1200.0])
    best_logit = (cp / losses.WIN_PROB_SCALE_CP).requires_grad_()
    loss = losses.eval_loss(best_logit, cp / 100, "win_prob")
    loss.backward()
    assert best_logit.grad.abs().max() < 1e-6  # BCE's minimum: sigmoid(logit) = the target probability
    # lichess's formula: 2 / (1 + exp(-0.00368208 cp)) - 1 on a -1..1 scale == sigmoid(cp / 271.6) on 0..1
    lichess = (2 / (1 + torch.exp(-0.00368208 * cp)) - 1 + 1) / 2
    torch.testing.assert_close(torch.sigmoid(best_logit.detach()), lichess)
    torch.testing.assert_close(losses.to_pawns(best_logit.detach(), "win_prob"), cp / 100)


def test_pawns_loss_is_l1():
    out, target = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    assert losses.eval_loss(out, target, "pawns").item() == (0.5 + 3.0) / 2
    assert math.isclose(losses.WIN_PROB_SCALE_CP, 271.59, rel_tol=1e-4)
