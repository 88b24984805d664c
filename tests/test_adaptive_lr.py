"""Tests for ngdiff_ds.adaptive_lr: parabola fit, acceptance, clipping, smoothing, schedules.

Expected numbers are computed independently of the module (closed forms, numpy.polyfit).
"""

import copy
import json
import math

import numpy as np
import pytest
import torch

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.adaptive_lr import (
    AdaptiveLRConfig,
    AdaptiveLRState,
    effective_lr,
    fit_parabola,
    is_fit_step,
    schedule_factor,
    update,
)

THREE_POINTS = (-1.0, 0.0, 1.0)
FIVE_POINTS = (-2.0, -1.0, 0.0, 1.0, 2.0)


def shifted_parabola(a, s0, c, multiples):
    """Losses of L(s) = a*(s - s0)^2 + c at the given multiples."""
    return [a * (s - s0) ** 2 + c for s in multiples]


def make_config(**overrides):
    config = AdaptiveLRConfig(**overrides)
    config.validate()
    return config


# ---------------------------------------------------------------- fit_parabola


def test_fit_parabola_recovers_exact_quadratic_three_points():
    a, s0, c = 0.7, 0.6, 2.5
    curvature, slope, intercept, r2 = fit_parabola(
        list(THREE_POINTS), shifted_parabola(a, s0, c, THREE_POINTS)
    )
    # Expanding a*(s - s0)^2 + c: a*s^2 - 2*a*s0*s + (a*s0^2 + c).
    assert curvature == pytest.approx(a, rel=1e-13)
    assert slope == pytest.approx(-2 * a * s0, rel=1e-13)
    assert intercept == pytest.approx(a * s0**2 + c, rel=1e-13)
    assert r2 is None


def test_fit_parabola_five_points_matches_numpy_polyfit():
    multiples = list(FIVE_POINTS)
    rng = np.random.default_rng(3)
    losses = list(shifted_parabola(1.3, 0.4, 5.0, multiples) + 0.05 * rng.standard_normal(5))
    curvature, slope, intercept, r2 = fit_parabola(multiples, losses)

    expected = np.polyfit(multiples, losses, 2)
    residual = np.asarray(losses) - np.polyval(expected, multiples)
    expected_r2 = 1 - (residual**2).sum() / ((np.asarray(losses) - np.mean(losses)) ** 2).sum()
    np.testing.assert_allclose([curvature, slope, intercept], expected, rtol=1e-10)
    assert r2 == pytest.approx(expected_r2, rel=1e-10)


def test_fit_parabola_rejects_too_few_distinct_points():
    with pytest.raises(ValueError):
        fit_parabola([0.0, 1.0, 1.0], [1.0, 2.0, 2.0])
    with pytest.raises(ValueError):
        fit_parabola([-1.0, 0.0, 1.0], [1.0, 2.0])


# ---------------------------------------------------------------- update: accepted fits


def test_update_exact_quadratic_gives_optimum_and_smoothed_rate():
    a, s0, c = 0.7, 0.6, 2.5
    lr = 0.01
    config = make_config(smoothing=0.5, clip_low=0.1, clip_high=10.0)
    state, result = update(AdaptiveLRState(lr=lr), config, shifted_parabola(a, s0, c, THREE_POINTS))

    assert result.accepted and result.reason == "accepted"
    assert result.optimal_multiple == pytest.approx(s0, rel=1e-12)
    expected_lr = 0.5 * lr + 0.5 * (s0 * lr)  # s0 * lr = 0.006 lies inside [0.001, 0.1]
    assert state.lr == pytest.approx(expected_lr, rel=1e-12)
    assert result.lr_before == lr and result.lr_after == state.lr
    assert (state.num_fits, state.num_accepted, state.num_rejected) == (1, 1, 0)
    assert state.last_fit == result.to_dict()


def test_overshooting_step_is_accepted_and_shrinks_rate():
    # A rate 10x too large: the optimum is at s* = 0.1, L(+1) > L(0), positive curvature.
    losses = shifted_parabola(2.0, 0.1, 1.0, THREE_POINTS)
    assert losses[2] > losses[1]
    config = make_config(smoothing=1.0)
    state, result = update(AdaptiveLRState(lr=1.0), config, losses)
    assert result.accepted
    assert state.lr == pytest.approx(0.1, rel=1e-12)


@pytest.mark.parametrize(
    "s0, expected_factor",
    [
        (50.0, 10.0),  # far beyond the band: clipped to clip_high
        (0.01, 0.1),  # far below the band: clipped to clip_low
        (3.0, 3.0),  # inside the band: unclipped
    ],
)
def test_proposal_is_clipped_to_band(s0, expected_factor):
    lr = 0.2
    config = make_config(smoothing=1.0, clip_low=0.1, clip_high=10.0)
    losses = shifted_parabola(1.0, s0, 3.0, THREE_POINTS)
    state, result = update(AdaptiveLRState(lr=lr), config, losses)
    assert result.accepted
    assert result.optimal_multiple == pytest.approx(s0, rel=1e-10)
    assert state.lr == pytest.approx(expected_factor * lr, rel=1e-10)


@pytest.mark.parametrize("beta", [1.0, 0.25, 0.5])
def test_smoothing_formula(beta):
    lr, s0 = 0.05, 2.0
    config = make_config(smoothing=beta)
    state, _ = update(AdaptiveLRState(lr=lr), config, shifted_parabola(0.3, s0, 1.0, THREE_POINTS))
    assert state.lr == pytest.approx((1 - beta) * lr + beta * s0 * lr, rel=1e-12)


# ---------------------------------------------------------------- update: refused fits


@pytest.mark.parametrize(
    "losses, reason",
    [
        (shifted_parabola(-1.0, 0.5, 3.0, THREE_POINTS), "non-positive curvature"),  # concave
        ([2.0, 2.0, 2.0], "non-positive curvature"),  # flat
        # Noisy-flat: curvature 2e-10 is positive but far below 1e-8 * |L(0)| = 2e-8.
        ([2.0 + 1e-10, 2.0, 2.0 + 3e-10], "non-positive curvature"),
        (shifted_parabola(1.0, -0.5, 3.0, THREE_POINTS), "not downhill"),  # uphill, s* < 0
        ([3.0, 2.0, 3.0], "not downhill"),  # optimum exactly at s* = 0
        ([float("nan"), 2.0, 1.0], "non-finite loss"),
        ([3.0, float("inf"), 1.0], "non-finite loss"),
        ([3.0, 2.0, float("-inf")], "non-finite loss"),
    ],
)
def test_refused_fit_keeps_rate_and_records_reason(losses, reason):
    start = AdaptiveLRState(lr=0.3, num_fits=4, num_accepted=3, num_rejected=1)
    state, result = update(start, make_config(), losses)
    assert not result.accepted
    assert result.reason == reason
    assert result.optimal_multiple is None
    assert state.lr == 0.3 and result.lr_after == 0.3
    assert (state.num_fits, state.num_accepted, state.num_rejected) == (5, 3, 2)


def test_counters_over_a_sequence_and_input_state_untouched():
    config = make_config()
    start = AdaptiveLRState(lr=1.0)
    snapshot = copy.deepcopy(start)
    good = shifted_parabola(1.0, 0.5, 1.0, THREE_POINTS)
    concave = shifted_parabola(-1.0, 0.5, 1.0, THREE_POINTS)

    state, _ = update(start, config, good)
    state, _ = update(state, config, concave)
    state, last = update(state, config, [math.nan, 1.0, 1.0])

    assert start == snapshot
    assert (state.num_fits, state.num_accepted, state.num_rejected) == (3, 1, 2)
    assert state.last_fit["reason"] == last.reason == "non-finite loss"


def test_update_rejects_wrong_number_of_losses():
    with pytest.raises(ValueError):
        update(AdaptiveLRState(lr=1.0), make_config(), [1.0, 2.0])


def test_five_point_fit_accepted_when_good_refused_when_poor():
    config = make_config(multiples=FIVE_POINTS, smoothing=1.0, min_r2=0.9)

    clean = shifted_parabola(1.0, 0.5, 1.0, FIVE_POINTS)
    state, result = update(AdaptiveLRState(lr=1.0), config, clean)
    assert result.accepted and result.r2 == pytest.approx(1.0, abs=1e-12)
    assert state.lr == pytest.approx(0.5, rel=1e-10)

    # Same parabola plus a zig-zag that least squares cannot absorb (it leaves curvature and
    # slope as they were): the fit is convex and downhill, so only the quality check refuses.
    zigzag = [0.0, 2.0, -2.0, 2.0, 0.0]
    noisy = [v + z for v, z in zip(clean, zigzag)]
    curvature, slope, _, r2 = fit_parabola(list(FIVE_POINTS), noisy)
    assert curvature > 0 and slope < 0 and r2 < 0.9
    state, result = update(AdaptiveLRState(lr=1.0), config, noisy)
    assert not result.accepted
    assert result.reason.startswith("poor fit (r2=")
    assert state.lr == 1.0

    permissive = make_config(multiples=FIVE_POINTS, smoothing=1.0, min_r2=0.0)
    _, result = update(AdaptiveLRState(lr=1.0), permissive, noisy)
    assert result.accepted


# ---------------------------------------------------------------- schedules and fit steps


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        ("constant", 0, 1.0),
        ("constant", 50, 1.0),
        ("constant", 1000, 1.0),
        ("linear", 0, 1.0),
        ("linear", 50, 0.55),  # halfway between 1 and 0.1
        ("linear", 100, 0.1),
        ("linear", 250, 0.1),  # clamped past the end
        ("cosine", 0, 1.0),
        ("cosine", 25, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
        ("cosine", 50, 0.55),
        ("cosine", 100, 0.1),
        ("cosine", 250, 0.1),
    ],
)
def test_schedule_factor(schedule, step, expected):
    config = make_config(schedule=schedule, total_steps=100, min_schedule_factor=0.1)
    assert schedule_factor(config, step) == pytest.approx(expected, rel=1e-12)


def test_effective_lr_is_base_rate_times_schedule():
    config = make_config(schedule="cosine", total_steps=10, min_schedule_factor=0.0)
    state = AdaptiveLRState(lr=0.2)
    assert effective_lr(state, config, 0) == pytest.approx(0.2)
    assert effective_lr(state, config, 5) == pytest.approx(0.1)
    assert effective_lr(state, config, 10) == pytest.approx(0.0, abs=1e-15)


def test_is_fit_step_period_and_warmup():
    # step = number of completed optimizer steps (1 after the first step).
    every_fourth = make_config(period=4)
    assert [s for s in range(1, 14) if is_fit_step(every_fourth, s)] == [1, 5, 9, 13]

    warm = make_config(period=3, warmup_steps=10)
    assert [s for s in range(0, 21) if is_fit_step(warm, s)] == [11, 14, 17, 20]

    every_step = make_config(period=1, warmup_steps=2)
    assert [s for s in range(0, 6) if is_fit_step(every_step, s)] == [3, 4, 5]

    disabled = make_config(enabled=False, period=1)
    assert not any(is_fit_step(disabled, s) for s in range(0, 10))


# ---------------------------------------------------------------- config and state


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("period", {"period": 0}),
        ("smoothing", {"smoothing": 0.0}),
        ("smoothing", {"smoothing": 1.5}),
        ("clip_low", {"clip_low": 0.0}),
        ("clip_low", {"clip_low": 1.5}),
        ("clip_high", {"clip_high": 0.5}),
        ("multiples", {"multiples": (0.0, 1.0, 1.0)}),
        ("multiples", {"multiples": (-1.0, 1.0, 2.0)}),
        ("schedule", {"schedule": "step"}),
        ("probe_loss", {"probe_loss": "all"}),
        ("total_steps", {"schedule": "linear", "total_steps": 0}),
        ("total_steps", {"schedule": "cosine", "total_steps": 0}),
        ("warmup_steps", {"warmup_steps": -1}),
        ("min_r2", {"min_r2": 1.5}),
        ("min_schedule_factor", {"min_schedule_factor": 2.0}),
    ],
)
def test_config_validation_names_the_field(field, overrides):
    with pytest.raises(ConfigError, match=field):
        AdaptiveLRConfig(**overrides).validate()


def test_default_config_is_valid_and_list_multiples_become_tuple():
    AdaptiveLRConfig().validate()
    config = make_config(multiples=[-1, 0, 1, 2], probe_loss="both")
    assert config.multiples == (-1.0, 0.0, 1.0, 2.0)


@pytest.mark.parametrize(
    "losses", [shifted_parabola(1.0, 0.5, 1.0, THREE_POINTS), [math.nan, 1.0, 1.0]]
)
def test_state_json_round_trip(losses):
    start = AdaptiveLRState(lr=0.125, num_fits=2, num_accepted=1, num_rejected=1)
    state, _ = update(start, make_config(), losses)
    text = json.dumps(state.to_dict())
    restored = AdaptiveLRState.from_dict(json.loads(text))
    # Compare serialised forms: NaN coefficients of a refused fit are never == themselves.
    assert json.dumps(restored.to_dict()) == text
    assert restored.lr == state.lr
    refused = int(math.isnan(losses[0]))
    counters = (restored.num_fits, restored.num_accepted, restored.num_rejected)
    assert counters == (3, 2 - refused, 1 + refused)

    fresh = AdaptiveLRState(lr=1e-3)
    assert AdaptiveLRState.from_dict(json.loads(json.dumps(fresh.to_dict()))) == fresh


# ---------------------------------------------------------------- simulated training run


def _convex_quadratic(dim=20, condition=10.0, seed=0):
    """A = Q diag(eigs) Q^T with eigenvalues spread over [1/condition, 1], and b."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(1.0 / condition, 1.0, dim, dtype=torch.float64)
    a = q @ torch.diag(eigenvalues) @ q.T
    b = torch.randn(dim, generator=generator, dtype=torch.float64)
    return a, b, float(eigenvalues.min()), float(eigenvalues.max())


@pytest.mark.parametrize("beta", [0.5, 1.0])
@pytest.mark.parametrize("start_factor", [0.01, 10.0])
def test_gradient_descent_with_fitted_rate_recovers_from_bad_start(start_factor, beta):
    a, b, eig_min, eig_max = _convex_quadratic()

    def objective(x):
        return float(0.5 * x @ a @ x - b @ x)

    optimum = objective(torch.linalg.solve(a, b))
    good_lr = 1.0 / eig_max
    config = make_config(period=1, smoothing=beta, clip_low=0.1, clip_high=10.0)
    state = AdaptiveLRState(lr=start_factor * good_lr)

    x = torch.zeros(a.shape[0], dtype=torch.float64)
    gaps = [objective(x) - optimum]
    rates = [state.lr]  # rates[k] = rate after k fits
    for step in range(1, 101):
        x_old = x
        delta = -effective_lr(state, config, step - 1) * (a @ x_old - b)
        x = x_old + delta
        if is_fit_step(config, step):
            probe_losses = [objective(x_old + s * delta) for s in config.multiples]
            state, _ = update(state, config, probe_losses)
            rates.append(state.lr)
        gaps.append(objective(x) - optimum)

    trajectory = "lr/good over fits: " + ", ".join(f"{r / good_lr:.3g}" for r in rates[:20])
    in_band = [0.2 * good_lr <= r <= 5.0 * good_lr for r in rates]
    first_in_band = in_band.index(True) if any(in_band) else None
    assert first_in_band is not None and first_in_band <= 8, trajectory

    # Monotone toward the working range until it is reached.
    approach = rates[: first_in_band + 1]
    steps = [later - earlier for earlier, later in zip(approach, approach[1:])]
    moving_right_way = all(d > 0 for d in steps) if start_factor < 1 else all(d < 0 for d in steps)
    assert moving_right_way, trajectory

    # Every accepted proposal is the exact line-search rate g.g / g.A.g of a past gradient,
    # which lies in [1/eig_max, 1/eig_min]; a convex combination never leaves that interval.
    lower, upper = 1.0 / eig_max, 1.0 / eig_min
    reached = next(k for k, r in enumerate(rates) if lower <= r <= upper)
    assert reached <= 8, trajectory
    assert all(lower * (1 - 1e-9) <= r <= upper * (1 + 1e-9) for r in rates[reached:]), trajectory

    assert gaps[-1] < 1e-6 * gaps[0], f"{trajectory}; f - f* from {gaps[0]:.3g} to {gaps[-1]:.3g}"
