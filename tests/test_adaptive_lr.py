"""Tests for ngdiff_ds.adaptive_lr: parabola fit, acceptance, clipping, smoothing, schedules,
and the rise budget with backtracking.

Expected numbers are computed independently of the module (closed forms, numpy.polyfit).
``make_config`` turns the rise budget off (GeN's published rule) unless a test asks for it.
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
    backtrack,
    backtrack_multiples,
    budget_multiple,
    effective_lr,
    exceeds_budget,
    needs_backtrack,
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
    config = AdaptiveLRConfig(**{"max_rise": 0.0, **overrides})
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
        ("max_rise", {"max_rise": -0.1}),
        ("max_rise", {"max_rise": math.inf}),
        ("multiples", {"multiples": (-1.0, 0.0, 2.0)}),  # budget on: the step itself needed
        ("backtrack_factor", {"backtrack_factor": 1.0}),
        ("backtrack_rise", {"max_rise": 0.02, "backtrack_rise": 0.01}),
        ("probe_loss", {"max_rise": 0.01, "probe_loss": "both"}),
        ("max_backtracks", {"max_backtracks": 0}),
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


# ---------------------------------------------------------------- rise budget, backtracking


def budget_config(**overrides):
    return make_config(**{"max_rise": 0.01, "smoothing": 1.0, **overrides})


def test_exceeds_budget_is_relative_to_the_loss_before_the_step():
    config = budget_config(max_rise=0.05, backtrack_rise=0.05)
    assert not exceeds_budget(config, 2.0, 2.0 + 0.099)   # 4.95 % rise
    assert exceeds_budget(config, 2.0, 2.0 + 0.101)        # 5.05 %
    assert exceeds_budget(config, -2.0, -2.0 + 0.101)      # |L(0)| for a negative loss
    assert exceeds_budget(config, 2.0, math.nan)
    assert exceeds_budget(config, 2.0, math.inf)
    assert not exceeds_budget(config, 2.0, 1.0)            # a fall is always within
    assert not exceeds_budget(make_config(max_rise=0.0), 2.0, 100.0)  # budget off


def test_only_a_rise_above_the_backtrack_threshold_shortens_the_step():
    config = budget_config(max_rise=0.01, backtrack_rise=0.05)
    assert not needs_backtrack(config, 1.0, 1.049)  # over the budget: steers the rate only
    assert exceeds_budget(config, 1.0, 1.049)
    assert needs_backtrack(config, 1.0, 1.051)
    assert needs_backtrack(config, 1.0, math.nan)
    assert not needs_backtrack(make_config(max_rise=0.0, backtrack_rise=0.0), 1.0, 100.0)


@pytest.mark.parametrize("curvature, slope, expected", [
    (1.0, -1.0, (1.0 + math.sqrt(1.0 + 4 * 0.02)) / 2),  # convex, downhill: beyond 2 s* = 1
    (1.0, 0.5, (-0.5 + math.sqrt(0.25 + 4 * 0.02)) / 2),  # convex, uphill
    (0.0, 0.04, 0.5),                                      # a line rising 0.04 per step
    (0.0, -0.04, math.inf),                                # a falling line never rises
    (-1.0, 0.1, (0.1 - math.sqrt(0.01 - 4 * 0.02)) / 2 if 0.01 >= 0.08 else math.inf),
    (-1.0, 0.5, (0.5 - math.sqrt(0.25 - 4 * 0.02)) / 2),   # concave, crosses on the way up
])
def test_budget_multiple_solves_the_rise_equation(curvature, slope, expected):
    """budget = 0.01 * |L(0)| = 0.02: the smallest s > 0 with a s^2 + b s = 0.02, by hand."""
    got = budget_multiple(budget_config(), curvature, slope, 2.0)
    assert got == pytest.approx(expected, rel=1e-12) if math.isfinite(expected) else got == expected
    if math.isfinite(got):
        assert curvature * got ** 2 + slope * got == pytest.approx(0.02, rel=1e-9)


def test_rise_budget_sets_the_rate_that_spends_the_budget():
    """A linear rise of 0.8 % of L(0) per step with budget 1 %: the step may be 1.25x longer."""
    config = budget_config(smoothing=1.0)
    losses = [1.0 - 0.008, 1.0, 1.0 + 0.008]  # L(s) = 1 + 0.008 s: "non-positive curvature"
    state, result = update(AdaptiveLRState(lr=1e-4), config, losses)
    assert result.rule == "rise budget" and result.reason == "non-positive curvature"
    assert state.lr == pytest.approx(1.25e-4, rel=1e-9)
    assert not result.refit_next  # a x1.25 target is not "far" ([0.5, 2] is near)
    # target x2.5: far (a refit follows), and growth is capped at x2 (the profile is not flat)
    _, far = update(AdaptiveLRState(lr=1e-4), config, [1.0 - 0.004, 1.0, 1.0 + 0.004])
    assert far.refit_next and far.lr_after == pytest.approx(2e-4, rel=1e-9)


def test_a_falling_profile_grows_the_rate_at_most_2x_a_flat_one_10x():
    config = budget_config(smoothing=1.0, clip_high=10.0)
    falling = [1.04, 1.0, 0.96]  # the retain loss improves along the step: no budget root
    _, result = update(AdaptiveLRState(lr=1e-4), config, falling)
    assert result.lr_after == pytest.approx(2e-4) and result.refit_next
    flat = [1.0 + 1e-4, 1.0, 1.0 - 1e-4]  # under a tenth of the budget 0.01 either way
    _, result = update(AdaptiveLRState(lr=1e-4), config, flat)
    assert result.lr_after == pytest.approx(1e-3)


def test_rise_budget_overrides_a_convex_minimum_and_is_smoothed():
    """GeN would set s* = 0.5; the budget allows s = 0.5 + sqrt(0.25 + 0.01); smoothing 0.5
    in log space: the rate moves by its square root."""
    config = budget_config(smoothing=0.5)
    losses = shifted_parabola(1.0, 0.5, 1.0 - 0.25, THREE_POINTS)  # L(s) = s^2 - s + 1
    state, result = update(AdaptiveLRState(lr=1.0), config, losses)
    assert result.accepted and result.optimal_multiple == pytest.approx(0.5)
    target = 0.5 + math.sqrt(0.25 + 0.01)
    assert state.lr == pytest.approx(math.sqrt(target), rel=1e-9)


def test_flat_profile_grows_the_rate_to_the_clip_and_asks_for_a_refit():
    config = budget_config(smoothing=0.5, clip_high=10.0)
    state, result = update(AdaptiveLRState(lr=1e-6), config, [0.13, 0.13, 0.13])
    assert state.lr == pytest.approx(1e-6 * math.sqrt(10.0))  # target inf, clipped to 10
    assert result.refit_next and state.refit_next
    assert is_fit_step(config, 7, state)  # any step, not only every period
    assert not is_fit_step(make_config(refit_when_far=False), 7, state)


@pytest.mark.parametrize("losses, reason", [([math.nan, 1.0, 1.0], "non-finite loss")])
def test_a_failed_measurement_keeps_the_rate_with_the_budget_on(losses, reason):
    state, result = update(AdaptiveLRState(lr=0.3), budget_config(), losses)
    assert (result.rule, result.reason, state.lr) == ("kept", reason, 0.3)


def test_backtrack_keeps_the_longest_try_within_the_budget():
    config = budget_config(max_rise=0.01, backtrack_factor=0.5, max_backtracks=6)
    losses = [4.2, 0.13, 3.28]  # the 1e-2 start of the embedded default, measured
    # first where the parabola through the probes rises by 0.0013, by hand: a = 3.61, b = -0.46
    first = (0.46 + math.sqrt(0.46 ** 2 + 4 * 3.61 * 0.0013)) / (2 * 3.61)
    assert backtrack_multiples(config, losses) == pytest.approx(
        [first * 0.5 ** k for k in range(6)], rel=1e-9)
    assert backtrack_multiples(config, [1.0, 1.0, math.nan]) == [0.5 ** k for k in range(1, 7)]
    tried = [0.5, 0.25, 0.125]
    tried_losses = [1.0, 0.2, 0.13 + 0.0012]  # the third is within 0.01 * 0.13 = 0.0013
    state, result = backtrack(AdaptiveLRState(lr=1e-2, num_fits=1), config, losses, tried,
                              tried_losses)
    assert result.rule == "backtrack" and not result.accepted
    assert result.step_multiple == 0.125
    assert state.lr == pytest.approx(1e-2 * 0.125)  # smoothing 1 (budget_config)
    smoothed, _ = backtrack(AdaptiveLRState(lr=1e-2), budget_config(smoothing=0.5), losses,
                            tried, tried_losses)
    assert smoothed.lr == pytest.approx(1e-2 * math.sqrt(0.125))
    assert state.refit_next and state.num_backtracks == 1 and state.num_fits == 2
    assert "over the budget" in result.reason
    # none within: the shortest try
    _, none_within = backtrack(AdaptiveLRState(lr=1e-2), config, losses, tried, [1.0, 0.9, 0.8])
    assert none_within.step_multiple == 0.125


def test_state_with_budget_fields_round_trips_and_old_checkpoints_load():
    state, _ = backtrack(AdaptiveLRState(lr=1.0), budget_config(), [1.0, 1.0, 2.0], [0.5],
                         [1.005])
    text = json.dumps(state.to_dict())
    restored = AdaptiveLRState.from_dict(json.loads(text))
    assert json.dumps(restored.to_dict()) == text
    assert restored.refit_next and restored.num_backtracks == 1 and restored.lr == 0.5
    old = {"lr": 0.1, "num_fits": 3, "num_accepted": 1, "num_rejected": 2, "last_fit": None}
    assert AdaptiveLRState.from_dict(old) == AdaptiveLRState(lr=0.1, num_fits=3, num_accepted=1,
                                                             num_rejected=2)


@pytest.mark.parametrize("start_factor", [1e-4, 1e4])
def test_budget_and_backtracking_find_the_rate_of_a_quadratic_from_far_away(start_factor):
    """Gradient descent on a convex quadratic from a rate 1e4 x too small or too large: the
    loss rises at most by the backtracking threshold (3 x the 1 % budget) after any step, and
    the rate ends within a factor 10 of the stable range."""
    a, b, eig_min, eig_max = _convex_quadratic()

    def objective(x):
        return float(0.5 * x @ a @ x - b @ x)

    config = budget_config(period=1, smoothing=0.5, max_backtracks=30)
    state = AdaptiveLRState(lr=start_factor / eig_max)
    x = torch.zeros(a.shape[0], dtype=torch.float64)
    for step in range(1, 61):
        x_old = x
        delta = -effective_lr(state, config, step - 1) * (a @ x_old - b)
        x = x_old + delta
        assert is_fit_step(config, step, state)
        losses = [objective(x_old + s * delta) for s in config.multiples]
        if needs_backtrack(config, losses[1], losses[2]):
            tried, tried_losses = [], []
            for multiple in backtrack_multiples(config, losses):
                tried.append(multiple)
                tried_losses.append(objective(x_old + multiple * delta))
                if not exceeds_budget(config, losses[1], tried_losses[-1]):
                    break
            state, result = backtrack(state, config, losses, tried, tried_losses)
            x = x_old + result.step_multiple * delta
        else:
            state, _ = update(state, config, losses)
        assert objective(x) - objective(x_old) <= 0.03 * abs(objective(x_old)) + 1e-12
    assert 0.1 / eig_max <= state.lr <= 10 * 2 / eig_max
    optimum = objective(torch.linalg.solve(a, b))
    assert objective(x) - optimum < 0.5 * (objective(torch.zeros_like(x)) - optimum)


def test_backtrack_threshold_defaults_to_three_budgets_and_checks_apply_only_when_enabled():
    assert make_config(max_rise=0.05).backtrack_rise == pytest.approx(0.15)
    assert AdaptiveLRConfig().backtrack_rise == pytest.approx(0.03)
    # a fixed rate needs no budget-compatible probe
    AdaptiveLRConfig(enabled=False, probe_loss="both").validate()
