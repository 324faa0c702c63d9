"""The discrete VAE: ReinMax's gradient, the straight-through forward value, the TCVAE estimator,
masking, and a short training run."""

import math

import pytest
import torch
from conftest import dvae_args

import losses
from chessdata.encoding import board_tokens, pack_fen
from model import MASK_TOKEN, DiscreteVAE
from tasks import dvae
from tasks.dvae import DVAEConfig, Ramp


def reinmax_gradient_closed_form(logits, sample, upstream, tau):
    """Liu et al. 2023: grad = 2 * J(pi1)^T g - J(pi0)^T g / 2 with J(p) = diag(p) - p p^T,
    pi0 = softmax(theta), pi1 = (D + softmax(theta / tau)) / 2, written independently of losses.py."""
    pi0 = torch.softmax(logits, -1)
    pi1 = (sample + torch.softmax(logits / tau, -1)) / 2

    def jvp(p, g):  # (diag(p) - p p^T) g, per row
        return p * g - p * (p * g).sum(-1, keepdim=True)

    return 2 * jvp(pi1, upstream) - jvp(pi0, upstream) / 2


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_reinmax_gradient_matches_the_paper(tau):
    torch.manual_seed(0)
    logits = torch.randn(64, 10, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(64, 10, dtype=torch.float64)
    out, sample = losses.reinmax(logits, tau)
    assert torch.equal(out.detach(), sample)  # the forward value is the one-hot sample itself
    assert torch.all(sample.sum(-1) == 1)
    (out * upstream).sum().backward()
    expected = reinmax_gradient_closed_form(logits.detach(), sample, upstream, tau)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-10, atol=1e-12)
    # the sign bug (`- theta` outside the stop-gradient) would anti-correlate with the estimator
    assert torch.nn.functional.cosine_similarity(logits.grad.flatten(), expected.flatten(), dim=0) > 0.999


def test_straight_through_forward_is_the_hard_sample():
    torch.manual_seed(1)
    logits = torch.randn(8, 4, 16, requires_grad=True)
    for mode in ("gumbel", "reinmax", "softmax"):
        codes, sample = losses.quantize(logits, mode, tau=0.5, hardness=1.0)
        assert torch.allclose(codes, sample, atol=1e-6), mode  # exactly one-hot forward
        assert torch.all(sample.sum(-1) == 1)
        codes.sum().backward() if mode == "softmax" else None
    softmax_codes, _ = losses.quantize(logits, "softmax", tau=1.0, hardness=0.0)
    torch.testing.assert_close(softmax_codes, logits.softmax(-1))  # hardness 0: the soft code
    half, sample = losses.quantize(logits, "softmax", tau=1.0, hardness=0.5)
    torch.testing.assert_close(half, (logits.softmax(-1) + sample) / 2)
    (grad,) = torch.autograd.grad(losses.quantize(logits, "softmax", 1.0, 1.0)[0][..., 0].sum(), logits)
    assert grad.abs().sum() > 0  # the straight-through code still carries a gradient


def peaked_logits(codes: torch.Tensor, num_codes: int, sharpness: float = 8.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(codes, num_codes).double() * sharpness


def test_tc_estimator_tells_correlated_from_independent_latents():
    torch.manual_seed(2)
    batch, latents, num_codes, dataset = 1024, 3, 4, 100_000
    independent = torch.randint(0, num_codes, (batch, latents))
    correlated = independent[:, :1].expand(-1, latents)  # every latent carries the same code
    results = {}
    for name, codes in (("independent", independent), ("correlated", correlated)):
        logits = peaked_logits(codes, num_codes)
        sample = torch.nn.functional.one_hot(codes, num_codes).double()
        terms = losses.tcvae_terms(logits, sample, dataset)
        results[name] = {k: v.item() for k, v in terms.items()}
        # the three terms add up to the sampled KL to the uniform prior, summed over latents
        log_q = logits.log_softmax(-1)
        sampled_kl = ((sample * log_q).sum(-1) + math.log(num_codes)).sum(-1).mean()
        assert sum(terms.values()).item() == pytest.approx(sampled_kl.item(), rel=1e-5)
    assert abs(results["independent"]["tc"]) < 0.1
    # the same code in all 3 latents: TC = 2 log 4 in the limit
    assert results["correlated"]["tc"] > 2 * math.log(num_codes) - 0.3
    assert results["correlated"]["tc"] > results["independent"]["tc"] + 2


def test_kl_uniform():
    assert losses.kl_uniform(torch.zeros(2, 3, 8)).item() == pytest.approx(0.0, abs=1e-7)
    certain = torch.full((1, 1, 8), -1e9)
    certain[..., 0] = 0
    assert losses.kl_uniform(certain).item() == pytest.approx(math.log(8), rel=1e-5)


def test_board_tokens_of_the_start_position():
    tokens = board_tokens(torch.from_numpy(pack_fen("rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w KQkq - 0 1")[None]))
    symbols = " KQRBNPkqrbnp"
    assert "".join(symbols[t] for t in tokens[0, :8]) == "RNBQKBNR"  # a1..h1
    assert "".join(symbols[t] for t in tokens[0, 56:]) == "rnbqkbnr"  # a8..h8
    assert (tokens[0, 16:48] == 0).all()


def test_masking_only_in_training(prepared):
    cfg = DVAEConfig()
    cfg.model = type(cfg.model)(latents=4, codebook=8, width=16, depth=1)
    cfg.dvae.mask = Ramp(0.9, 0.9, 0, 0, "constant")
    tokens = torch.randint(0, 13, (256, 64))
    masked = dvae.mask_squares(tokens, 0.9)
    assert (masked == MASK_TOKEN).any() and ((masked == tokens) | (masked == MASK_TOKEN)).all()
    assert torch.equal(dvae.mask_squares(tokens, 0.0), tokens)

    # Validation never masks: the metrics do not depend on the mask setting, and the encoder never sees MASK.
    seen = []
    torch.manual_seed(0)
    model = DiscreteVAE(4, 8, 16, 1)
    original = model.token_embedding.forward
    model.token_embedding.forward = lambda t: (seen.append(t), original(t))[1]

    from lightning_fabric import Fabric

    import data
    from kibitz import evaluation

    fabric = Fabric(accelerator="cpu", devices=1)
    cfg.data.dir = prepared
    loader = data.make_loader(dvae.board_datasets(cfg)["val"], batch_size=512)
    metrics, histograms = evaluation.evaluate(fabric, cfg, dvae.DVAE, model, loader)
    assert seen and all(not (t == MASK_TOKEN).any() for t in seen if t.dtype == torch.int64)
    cfg.dvae.mask = Ramp()
    assert evaluation.evaluate(fabric, cfg, dvae.DVAE, model, loader)[0] == metrics
    assert 0 <= metrics["token_acc"] <= 1 and metrics["codes_used"] >= 1
    assert len(histograms) == 4 and sum(h[0].sum() for h in histograms.values()) == 4 * metrics["boards"]


def read_metrics(run_dir):
    import csv

    rows = {}
    with open(run_dir / "metrics.csv") as f:
        for r in csv.DictReader(f):
            rows.setdefault(r["name"], {})[int(r["step"])] = float(r["value"])
    return rows


@pytest.mark.parametrize("quantizer", ["gumbel", "reinmax"])
def test_dvae_trains_logs_its_schedules_and_evaluates(prepared, tmp_path, quantizer, capsys):
    import json

    import train
    from kibitz import tools

    assert (
        train.main(dvae_args(prepared, tmp_path, "--run-name", "d", "--dvae.quantizer", quantizer, "--dvae.tcvae")) == 0
    )
    run_dir = tmp_path / "d"
    rows = read_metrics(run_dir)
    # the scheduled values follow from the step alone (the ramp formulas) and are logged
    assert rows["schedule/kl_weight"] == {s: pytest.approx(0.5 * min(s, 30) / 30) for s in (10, 20, 30, 40)}
    assert rows["schedule/tau"][40] == pytest.approx(1 / 16) and rows["schedule/tau"][10] < 1
    assert rows["schedule/mask"][10] == pytest.approx(0.3)
    for name in (
        "train/recon_loss",
        "train/kl",
        "train/mi",
        "train/tc",
        "train/dwkl",
        "perf/tokens_per_s",
        "val/token_acc",
        "val/board_acc",
        "val/perplexity",
        "val/codes_used",
    ):
        assert name in rows, name
    losses_seen = rows["train/recon_loss"]
    assert losses_seen[40] < losses_seen[10]  # it learns
    test = json.loads((run_dir / "test_metrics.json").read_text())
    assert test["test/token_acc"] > 0.6
    # `dvae evaluate` reproduces the test metrics printed by training for the same (best) checkpoint
    best = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))
    capsys.readouterr()
    results = [tools.evaluate(tools.EvaluateArgs(ckpt=path, accelerator="cpu"), dvae.DVAE) for path in best]
    assert any(
        r["token_acc"] == pytest.approx(test["test/token_acc"])
        and r["board_acc"] == pytest.approx(test["test/board_acc"])
        for r in results
    )
    assert "token_acc" in capsys.readouterr().out
    # a chess tool on a dVAE checkpoint is a one-line error
    assert train.main(["chess", "evaluate", "--ckpt", str(best[0])]) == 2
    assert "is a checkpoint of the 'dvae' task" in capsys.readouterr().err


def test_an_empty_evaluation_batch_adds_nothing():
    """Under FSDP a rank one example short ends its evaluation on an empty batch (data.EpochBatches)."""
    model = DiscreteVAE(4, 8, 16, 1).eval()
    tokens = board_tokens(torch.zeros(0, 101, dtype=torch.uint8))
    token_logits, code_logits, _ = model(tokens)
    assert torch.equal(losses.dvae_metric_sums(token_logits, tokens, code_logits), torch.zeros(5))
