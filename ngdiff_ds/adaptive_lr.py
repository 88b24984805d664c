"""Adaptive learning rate by a parabola fit along the last step (GeN, Bu & Xu, arXiv 2407.02772),
with a rise budget and backtracking.

After a step with rate ``lr`` moved the weights by ``delta`` (for SGD and AdamW ``delta`` is
linear in ``lr``), the engine evaluates a probe loss ``L(s) = loss(theta_old + s * delta)`` at a
few step multiples ``s`` (default ``-1, 0, +1``; ``L(+1)`` is the loss at the current weights;
the loop measures them on the next step's batch, see lr_probe.py). This module turns those numbers
into the next rate; it is pure Python plus a float64 ``torch.linalg.lstsq`` and knows nothing of
DeepSpeed (``settings.option`` only declares each field's command-line flag).

The fit ``L(s) ~ curvature * s**2 + slope * s + intercept`` has its minimum at
``s* = -slope / (2 * curvature)``: the step that would have been best is ``s*`` times the one
taken, so the rate that would have produced it is ``s* * lr``. GeN's checks of the parabola
(the reason is logged with every fit):

1. every loss is finite ("non-finite loss");
2. with more than 3 points, the fit explains the data, ``r2 >= min_r2`` ("poor fit (r2=...)").
   Checked before the shape tests because a badly fitting parabola's curvature and slope mean
   nothing, and "poor fit" is then the reason worth reporting;
3. the curvature is positive, i.e. above ``min_curvature_rel * (|L(0)| + 1e-12)``
   ("non-positive curvature"); the relative floor refuses profiles that are flat up to noise,
   whose ``s*`` would be arbitrary;
4. the optimum lies ahead, ``s* > 0`` (equivalently ``slope < 0``) ("not downhill").

The rate set from a fit, with the rise budget on (``max_rise > 0``, the default):

* **backtracking** (``needs_backtrack``, ``backtrack_multiples``, ``backtrack``): a step that
  raised the probe loss by more than ``backtrack_rise`` of ``|L(0)|`` is shortened: the loop
  tries shorter multiples until one raises it by at most ``max_rise`` and retakes the step
  there; the rate becomes ``lr * s ** smoothing``;
* **the rise budget** (``budget_multiple``): otherwise, for any finite, well-fitted profile,
  the target is the multiple where the parabola has risen by ``max_rise * |L(0)|``, clipped
  to ``[clip_low, 2]`` (``[clip_low, clip_high]`` on a flat profile) and approached
  ``smoothing`` of the way in log space.

Why: with the retain probe (the default) the retain loss rises along the NGDiff step at
every sensible rate, because the step trades retain loss for forgetting; GeN's minimum then
does not exist ("not downhill", the rate never moved) or lies below the rate that forgets,
and from a rate 100x too large its clip and smoothing cut too slowly (docs/design.md has the
measurements). The budget states how much retain loss one step may spend.

With ``max_rise = 0``, GeN's rule (Bu & Xu): accepted fits give
``proposal = clip(s* * lr, clip_low * lr, clip_high * lr)`` and
``lr <- (1 - beta) * lr + beta * proposal`` with ``beta = smoothing``; a refused fit leaves
the rate unchanged and its reason is recorded. A target multiple outside ``[0.5, 2]`` (either
rule) and every backtrack ask for a refit right after the next step (``refit_next``).

Step counting: ``step`` is always the number of optimizer steps completed so far (0 before the
first step, like a ``global_step`` counter), so a single counter serves both functions:

* ``effective_lr(state, config, step)`` is the rate for the next step, taken when ``step``
  steps are done (the schedule runs from factor 1 at ``step = 0`` to ``min_schedule_factor``
  at ``step = total_steps``);
* ``is_fit_step(config, step)`` is asked right after step number ``step`` (1-based) finished:
  no fit during the first ``warmup_steps`` steps, then one after step ``warmup_steps + 1`` and
  every ``period`` steps after that. The first fit comes as early as allowed because the
  starting rate is the least trustworthy one.

The schedule factor multiplies the fitted base rate; the fit rescales the base rate by the
relative multiple ``s*``, so both compose: a step taken with ``base * factor`` that should have
been ``s*`` times longer gives ``base * s*`` as the new base. The rise budget, though, targets
the rate of a step (the one that spends the budget), so between fits the schedule lowers the
rate and the next fit pulls it back toward that target: a decaying schedule mostly acts
between fits. Use a schedule with GeN's rule (``max_rise = 0``) for a decay that holds.
"""

from __future__ import annotations

import math

# the settings and state live in adaptive_lr_state.py, the parabola in parabola.py; their
# names are part of this module's interface
from ngdiff_ds.adaptive_lr_state import SCHEDULES, AdaptiveLRConfig, AdaptiveLRState, FitResult
from ngdiff_ds.parabola import fit_parabola, rise_root

__all__ = ["AdaptiveLRConfig", "AdaptiveLRState", "FitResult", "backtrack", "backtrack_multiples",
           "budget_multiple", "effective_lr", "exceeds_budget", "fit_parabola", "is_fit_step",
           "needs_backtrack", "rise_budget", "schedule_factor", "update"]

# Added to |L(0)| in the curvature floor so that a loss of exactly 0 still has a floor > 0.
_TINY = 1e-12


def is_fit_step(config: AdaptiveLRConfig, step: int,
                state: AdaptiveLRState | None = None) -> bool:
    """Whether to fit right after optimizer step ``step`` (1-based: the count of completed steps).

    No fit during the first ``warmup_steps`` steps; then after step ``warmup_steps + 1`` and
    every ``period`` steps after it, and after any step that follows a fit asking for a refit
    (``state.refit_next``: the rate is still far from its fit). Always False when disabled.
    """
    if not config.enabled or step <= config.warmup_steps:
        return False
    if state is not None and state.refit_next and config.refit_when_far:
        return True
    return (step - config.warmup_steps - 1) % config.period == 0


def schedule_factor(config: AdaptiveLRConfig, step: int) -> float:
    """Factor on the fitted rate for the next step, after ``step`` completed steps.

    constant: 1. linear: 1 -> ``min_schedule_factor`` over ``total_steps``. cosine: a half
    cosine from 1 to ``min_schedule_factor``. Past ``total_steps`` the factor stays at its end.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if config.schedule == "constant":
        return 1.0
    if config.total_steps <= 0:
        raise ValueError(f"total_steps must be > 0 for schedule {config.schedule!r}")
    progress = min(step / config.total_steps, 1.0)
    floor = config.min_schedule_factor
    if config.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    if config.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")


def effective_lr(state: AdaptiveLRState, config: AdaptiveLRConfig, step: int) -> float:
    """The rate to set on the optimizer for the next step: fitted base rate times the schedule."""
    return state.lr * schedule_factor(config, step)


def _loss_at_zero(config: AdaptiveLRConfig, losses: list[float]) -> float:
    return float(losses[config.multiples.index(0.0)])


def _refusal_reason(
    config: AdaptiveLRConfig,
    losses: list[float],
    curvature: float,
    slope: float,
    r2: float | None,
) -> str | None:
    """Why the fit must not be used, or None when it may. Order: data, fit quality, shape."""
    if r2 is not None and not r2 >= config.min_r2:  # `not >=` also refuses a NaN r2
        return f"poor fit (r2={r2:.4g})"
    curvature_floor = config.min_curvature_rel * (abs(_loss_at_zero(config, losses)) + _TINY)
    if not curvature > curvature_floor:
        return "non-positive curvature"
    if not slope < 0.0:  # with positive curvature, s* > 0 exactly when slope < 0
        return "not downhill"
    return None


# GeN's refusals that describe the profile's shape, not a failed measurement: the rise budget
# still sets the rate from them.
_SHAPE_REFUSALS = ("not downhill", "non-positive curvature")


# A fit whose target multiple lies outside this band says the rate is far from where it
# should be: the next fit comes right after the next step instead of a period later. (GeN's
# own clip band; measured: with smoothing 0.5 a x6 target otherwise waited 6 steps at x3.)
_FAR = (0.5, 2.0)


def _smoothed_rate(config: AdaptiveLRConfig, lr: float, multiple: float) -> tuple[float, bool]:
    """GeN's update: (the smoothed new rate, whether the target ``multiple`` is far from 1)."""
    proposal = min(max(multiple * lr, config.clip_low * lr), config.clip_high * lr)
    far = not _FAR[0] <= multiple <= _FAR[1]
    return (1.0 - config.smoothing) * lr + config.smoothing * proposal, far


def _geometric_rate(config: AdaptiveLRConfig, lr: float, multiple: float,
                    flat: bool) -> tuple[float, bool]:
    """The budget rule's update: ``lr * clip(multiple) ** smoothing``, a step of ``smoothing``
    of the way in log space. Each probe measures one batch, and at a fixed rate the rise of
    the retain loss differed up to 8x between batches (measured on the embedded default); an
    arithmetic average follows every high reading down by the full cut but a low one up by
    only half, so the rate hovered well below its budget. Halving in log space treats a x4
    and a x1/4 alike.

    Growth is clipped at ``clip_high`` only when the profile is ``flat`` (the step moved the
    probe loss by under a tenth of the budget: far too small to matter), else at GeN's x2: a
    probe that falls along the step (this batch's retain loss improves) puts the budget far
    ahead, and growing x3 per step on such readings reached 1e-3, which a single step
    tolerated and the next six did not (measured from the 1e-3 start)."""
    high = config.clip_high if flat else min(config.clip_high, _FAR[1])
    clipped = min(max(multiple, config.clip_low), high)
    far = not _FAR[0] <= multiple <= _FAR[1]
    return lr * clipped ** config.smoothing, far


def _is_flat(config: AdaptiveLRConfig, losses: list[float]) -> bool:
    """Every probe within a tenth of the rise budget of ``L(0)``."""
    loss_before = _loss_at_zero(config, losses)
    return all(abs(v - loss_before) <= 0.1 * rise_budget(config, loss_before) for v in losses)


def rise_budget(config: AdaptiveLRConfig, loss_before: float) -> float:
    """How much one step may raise the probe loss: ``max_rise`` times its value before the
    step (``L(0)``)."""
    return config.max_rise * (abs(loss_before) + _TINY)


def exceeds_budget(config: AdaptiveLRConfig, loss_before: float, loss_after: float,
                   fraction: float | None = None) -> bool:
    """Whether a step that took the probe loss from ``loss_before`` to ``loss_after`` raised it
    by more than ``fraction`` (default ``max_rise``) of ``|loss_before|``; a non-finite loss
    after the step always does. Never with the budget off."""
    if config.max_rise <= 0.0 or not math.isfinite(loss_before):
        return False
    fraction = config.max_rise if fraction is None else fraction
    return not loss_after - loss_before <= fraction * (abs(loss_before) + _TINY)


def needs_backtrack(config: AdaptiveLRConfig, loss_before: float, loss_after: float) -> bool:
    """Whether the step just taken must be shortened: it raised the probe loss by more than
    ``backtrack_rise``. A rise between ``max_rise`` and that only steers the rate (the rise
    of one batch varies several-fold at a fixed rate; cutting on each high reading made the
    rate oscillate)."""
    return exceeds_budget(config, loss_before, loss_after, config.backtrack_rise)


def backtrack_multiples(config: AdaptiveLRConfig, losses: list[float]) -> list[float]:
    """The shortened steps to try, longest first, for probes ``losses`` that exceeded the
    budget: first where the fitted parabola rises by exactly the budget (with 3 points it
    interpolates, so that lies in (0, 1)), then that times factor, factor**2, ...; from
    ``factor`` when the fit cannot say (a non-finite loss, or a fit that stays within)."""
    first = config.backtrack_factor
    if all(math.isfinite(v) for v in losses):
        curvature, slope, _, _ = fit_parabola(list(config.multiples), losses)
        target = budget_multiple(config, curvature, slope, _loss_at_zero(config, losses))
        if 0.0 < target < 1.0:
            first = target
    return [first * config.backtrack_factor ** k for k in range(config.max_backtracks)]


def budget_multiple(config: AdaptiveLRConfig, curvature: float, slope: float,
                    loss_before: float) -> float:
    """The smallest multiple ``s > 0`` at which the fitted parabola has risen by the rise
    budget, ``curvature * s**2 + slope * s = budget``; ``inf`` when it never does ahead."""
    return rise_root(curvature, slope, rise_budget(config, loss_before))


def update(
    state: AdaptiveLRState, config: AdaptiveLRConfig, losses: list[float]
) -> tuple[AdaptiveLRState, FitResult]:
    """Fit the probe losses (in the order of ``config.multiples``) and return a new state.

    The input state is not modified. With the rise budget on (``max_rise > 0``, the default)
    every well-fitted profile, convex or not, sets the rate at which the fitted profile rises
    by the budget (``budget_multiple``): a step that raised the probe loss by less than the
    budget may be longer, one that raised it by more must be shorter. Without it, GeN's rule:
    an accepted fit sets the rate from ``s*``. "non-finite loss" and "poor fit" keep the rate.
    Proposals are clipped and smoothed; a target outside [0.5, 2] asks for a refit right
    after the next step. The caller checks first (``needs_backtrack``) and backtracks instead.

    Why not ``s*`` with the retain probe: ``s*`` minimises the retain loss along the step, but
    the step exists to forget, which costs some retain loss; measured on the embedded default,
    a convex retain profile on one batch (s* = 0.13) pulled the rate down before forgetting
    had started.
    The budget says how much retain loss a step may spend; ``s*`` is below it by construction
    (the parabola is back at ``L(0)`` at ``2 s*``, the budget root lies beyond).
    """
    multiples = list(config.multiples)
    losses = [float(v) for v in losses]
    if len(losses) != len(multiples):
        raise ValueError(
            f"expected {len(multiples)} losses (one per multiple {multiples}), got {len(losses)}"
        )
    _check_rate(state)

    lr_before = float(state.lr)
    if all(math.isfinite(v) for v in losses):
        curvature, slope, intercept, r2 = fit_parabola(multiples, losses)
        reason = _refusal_reason(config, losses, curvature, slope, r2)
    else:
        # Nothing to fit; NaN marks the coefficients as absent.
        curvature = slope = intercept = math.nan
        r2 = None
        reason = "non-finite loss"

    accepted = reason is None
    optimal_multiple = -slope / (2.0 * curvature) if accepted else None
    rule, lr_after, far = "kept", lr_before, False
    if config.max_rise > 0.0 and (accepted or reason in _SHAPE_REFUSALS):
        rule = "rise budget"
        target = budget_multiple(config, curvature, slope, _loss_at_zero(config, losses))
        lr_after, far = _geometric_rate(config, lr_before, target, _is_flat(config, losses))
    elif accepted:
        rule = "fit"
        lr_after, far = _smoothed_rate(config, lr_before, optimal_multiple)

    refit_next = far and config.refit_when_far
    result = FitResult(
        multiples=multiples,
        losses=losses,
        curvature=curvature,
        slope=slope,
        intercept=intercept,
        r2=r2,
        optimal_multiple=optimal_multiple,
        accepted=accepted,
        reason="accepted" if accepted else reason,
        lr_before=lr_before,
        lr_after=lr_after,
        rule=rule,
        refit_next=refit_next,
    )
    return _next_state(state, result, backtracked=False), result


def backtrack(
    state: AdaptiveLRState, config: AdaptiveLRConfig, losses: list[float],
    tried: list[float], tried_losses: list[float],
) -> tuple[AdaptiveLRState, FitResult]:
    """The step just taken raised the probe loss by more than ``backtrack_rise`` (``losses``
    are the probes at ``config.multiples``): it is retaken at the longest tried multiple whose loss
    is within the budget (the shortest tried when none is), and the rate becomes the old one
    times that multiple to the power ``smoothing`` (unclipped), with a refit after the next
    step.

    Backtracking, not the parabola, because the parabola through s = -1, 0, +1 of a step that
    overshot by 100x says little about s = 0.01 (measured: it proposed 0.064 where 0.01 was
    needed); the tries measure the loss along the step until the budget holds.
    """
    _check_rate(state)
    loss_before = _loss_at_zero(config, losses)
    within = [m for m, v in zip(tried, tried_losses) if not exceeds_budget(config, loss_before, v)]
    multiple = max(within) if within else min(tried)
    lr_before = float(state.lr)
    # the step is cut to `multiple` (no damage kept); the rate of the next steps moves the
    # smoothed way in log space, unclipped below (a 100x overshoot must fall fast)
    lr_after = lr_before * multiple ** config.smoothing
    curvature = slope = intercept = math.nan
    r2 = None
    if all(math.isfinite(v) for v in losses):  # logged for the record; not used
        curvature, slope, intercept, r2 = fit_parabola(list(config.multiples), losses)
    result = FitResult(
        multiples=list(config.multiples),
        losses=[float(v) for v in losses],
        curvature=curvature, slope=slope, intercept=intercept, r2=r2,
        optimal_multiple=None,
        accepted=False,
        reason=f"rise {_rise_text(losses, loss_before, config)} over the budget "
               f"{config.max_rise:g}",
        lr_before=lr_before,
        lr_after=lr_after,
        rule="backtrack",
        step_multiple=multiple,
        backtrack_losses=[float(v) for v in tried_losses],
        refit_next=config.refit_when_far,
    )
    return _next_state(state, result, backtracked=True), result


def _rise_text(losses: list[float], loss_before: float, config: AdaptiveLRConfig) -> str:
    after = float(losses[config.multiples.index(1.0)])
    if not math.isfinite(after):
        return "to a non-finite loss"
    return f"{(after - loss_before) / (abs(loss_before) + _TINY):.3g}"


def _check_rate(state: AdaptiveLRState) -> None:
    if not (math.isfinite(state.lr) and state.lr > 0.0):
        raise ValueError(f"state.lr must be finite and > 0, got {state.lr!r}")


def _next_state(state: AdaptiveLRState, result: FitResult, backtracked: bool) -> AdaptiveLRState:
    return AdaptiveLRState(
        lr=result.lr_after,
        num_fits=state.num_fits + 1,
        num_accepted=state.num_accepted + int(result.accepted),
        num_rejected=state.num_rejected + int(not result.accepted),
        last_fit=result.to_dict(),
        num_backtracks=state.num_backtracks + int(backtracked),
        refit_next=result.refit_next,
    )
