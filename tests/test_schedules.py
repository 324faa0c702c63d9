import math

import pytest

import schedules


def test_constant():
    assert schedules.learning_rate(0, "constant", 1e-3, 10, 100, 0.1, 1, 512) == 1e-3
    assert schedules.learning_rate(999, "constant", 1e-3, 10, 100, 0.1, 1, 512) == 1e-3


def test_warmup_cosine_at_chosen_steps():
    lr = lambda s: schedules.warmup_cosine(s, 1.0, 10, 110, 0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr(4) == pytest.approx(0.5)
    assert lr(10) == pytest.approx(1.0)  # end of warmup = peak
    assert lr(60) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)  # halfway: 0.55
    assert lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)  # stays at the floor


def test_noam_formula():
    d_model, warmup = 512, 4000
    for step in (0, 99, 3999, 4000, 100_000):
        n = step + 1
        expected = 2.0 * d_model ** -0.5 * min(n ** -0.5, n * warmup ** -1.5)
        assert schedules.noam(step, 2.0, d_model, warmup) == pytest.approx(expected)
    # the peak is at the end of warmup
    peak = schedules.noam(warmup - 1, 1.0, d_model, warmup)
    assert peak == pytest.approx(d_model ** -0.5 * warmup ** -0.5)
    assert schedules.noam(warmup * 4 - 1, 1.0, d_model, warmup) == pytest.approx(peak / 2)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.learning_rate(0, "linear", 1e-3, 10, 100, 0.1, 1, 512)
