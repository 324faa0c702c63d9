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
        expected = 2.0 * d_model**-0.5 * min(n**-0.5, n * warmup**-1.5)
        assert schedules.noam(step, 2.0, d_model, warmup) == pytest.approx(expected)
    # the peak is at the end of warmup
    peak = schedules.noam(warmup - 1, 1.0, d_model, warmup)
    assert peak == pytest.approx(d_model**-0.5 * warmup**-0.5)
    assert schedules.noam(warmup * 4 - 1, 1.0, d_model, warmup) == pytest.approx(peak / 2)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.learning_rate(0, "linear", 1e-3, 10, 100, 0.1, 1, 512)


@pytest.mark.parametrize(
    "shape, formula",
    [
        ("linear", lambda a, b, p: a + (b - a) * p),
        ("exponential", lambda a, b, p: a * (b / a) ** p),
        ("cosine", lambda a, b, p: a + (b - a) * (1 - math.cos(math.pi * p)) / 2),
        ("threshold", lambda a, b, p: a),
    ],
)
def test_ramp_shapes_hold_then_move(shape, formula):
    start, end, hold, steps = 1.0, 1 / 16, 50, 200
    ramp = lambda step: schedules.ramp(step, start, end, hold, steps, shape)  # noqa: E731
    assert ramp(0) == start and ramp(hold - 1) == start  # held
    assert ramp(hold) == pytest.approx(start)  # the move starts from the held value
    for s in (1, 50, 100, 199):
        assert ramp(hold + s) == pytest.approx(formula(start, end, s / steps)), (shape, s)
    assert ramp(hold + steps) == end and ramp(10_000) == end  # the end T, then stays


def test_ramp_specific_values():
    # KL warmup 0 -> 6.6 over 5,000 steps (DALL-E), halfway is half
    assert schedules.ramp(2500, 0.0, 6.6, 0, 5000, "linear") == pytest.approx(3.3)
    # temperature 1 -> 1/16 cosine: halfway is the midpoint, exponential halfway is the geometric mean
    assert schedules.ramp(75_000, 1.0, 1 / 16, 0, 150_000, "cosine") == pytest.approx((1 + 1 / 16) / 2)
    assert schedules.ramp(75_000, 1.0, 1 / 16, 0, 150_000, "exponential") == pytest.approx(0.25)
    assert schedules.ramp(10, 1.0, 5.0, 0, 0, "linear") == 5.0  # no move: the end at once after the hold
    assert schedules.ramp(10**6, 0.3, 5.0, 0, 10, "constant") == 0.3
    with pytest.raises(ValueError, match="unknown ramp shape"):
        schedules.ramp(0, 0, 1, 0, 1, "step")
