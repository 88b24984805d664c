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
from dataclasses import asdict, dataclass, fields

import torch

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.settings import flag_of, option

PROBE_LOSSES = ("retain", "forget", "both")
SCHEDULES = ("constant", "linear", "cosine")

# Added to |L(0)| in the curvature floor so that a loss of exactly 0 still has a floor > 0.
_TINY = 1e-12


@dataclass
class AdaptiveLRConfig:
    """Settings of the parabola-fit rate; invalid values raise ConfigError naming the flag."""

    enabled: bool = option(True, flag="--no-adaptive-lr",
                           help="keep the learning rate fixed (times --lr-schedule)")
    # phi: fit every `period` steps (8 keeps the probe cost under ~10 %)
    period: int = option(8, flag="--lr-period", help="phi: fit the rate every this many steps")
    probe_loss: str = option("retain", choices=PROBE_LOSSES,
                             help="the loss measured along the step: retain, forget or both")
    multiples: tuple[float, ...] = option(
        (-1.0, 0.0, 1.0), flag="--probe-multiples",
        help="step multiples s where the probe loss is measured (must include 0)")
    smoothing: float = option(0.5, flag="--lr-smoothing",
                              help="beta: GeN's lr <- (1-beta) lr + beta clip(s* lr); the rise "
                                   "budget's lr <- lr clip(s)**beta")
    clip_low: float = option(0.1, flag="--lr-clip-low", help="proposal clipped to >= LOW lr")
    clip_high: float = option(10.0, flag="--lr-clip-high", help="proposal clipped to <= HIGH lr")
    warmup_steps: int = option(0, flag="--lr-warmup-steps", help="steps before the first fit")
    max_rise: float = option(
        0.01, flag="--lr-max-rise",
        help="rise budget: the most one step may raise the probe loss, as a fraction of its "
             "value before the step; each fit sets the rate that spends it, a step far over "
             "it is shortened (backtracking); 0: GeN's rule")
    backtrack_rise: float | None = option(
        None, flag="--lr-backtrack-rise",
        help="a step that raised the probe loss by more than this fraction is shortened to "
             "within --lr-max-rise (smaller rises only steer the rate); default 3 x "
             "--lr-max-rise")
    backtrack_factor: float = option(0.5, flag="--lr-backtrack-factor",
                                     help="each backtracking try shortens the step by this")
    max_backtracks: int = option(12, flag="--lr-max-backtracks",
                                 help="backtracking tries before the shortest step is kept")
    refit_when_far: bool = option(True, flag="--lr-no-refit",
                                  help="fit only every --lr-period steps, also when the last "
                                       "fit was far from the rate or backtracked")
    min_r2: float = 0.9  # fit-quality check, only used when len(multiples) > 3
    min_curvature_rel: float = 1e-8  # curvature must exceed this * (|L(0)| + tiny)
    schedule: str = option("constant", flag="--lr-schedule", choices=SCHEDULES,
                           help="factor multiplied on the fitted rate, decaying over --max-steps")
    total_steps: int = 0  # needed by linear/cosine: the run's --max-steps
    min_schedule_factor: float = option(0.0, flag="--lr-min-factor",
                                        help="final value of the linear/cosine schedule factor")

    def __post_init__(self) -> None:
        # Configs read from JSON/YAML give a list; keep one hashable, comparable type.
        self.multiples = tuple(float(m) for m in self.multiples)
        self.validate()

    def _refuse(self, name: str, requirement: str) -> None:
        flag = flag_of(self, name)
        where = name if flag == name else f"{flag} ({name})"
        raise ConfigError(f"{where} {requirement}, got {getattr(self, name)!r}")

    def validate(self) -> None:
        """Raise ConfigError, naming the offending field and its flag, for any bad setting."""
        if int(self.period) != self.period or self.period < 1:
            self._refuse("period", "must be an integer >= 1")
        if self.probe_loss not in PROBE_LOSSES:
            self._refuse("probe_loss", f"must be one of {PROBE_LOSSES}")
        self._validate_multiples()
        if not 0.0 < self.smoothing <= 1.0:
            self._refuse("smoothing", "must be in (0, 1]")
        if not 0.0 < self.clip_low <= 1.0:
            self._refuse("clip_low", "must be in (0, 1]")
        if not (self.clip_high >= 1.0 and math.isfinite(self.clip_high)):
            self._refuse("clip_high", "must be finite and >= 1")
        if int(self.warmup_steps) != self.warmup_steps or self.warmup_steps < 0:
            self._refuse("warmup_steps", "must be an integer >= 0")
        if not (self.max_rise >= 0.0 and math.isfinite(self.max_rise)):
            self._refuse("max_rise", "must be finite and >= 0")
        if self.backtrack_rise is None:
            self.backtrack_rise = 3.0 * self.max_rise
        if self.enabled and self.max_rise > 0.0 and self.probe_loss != "retain":
            self._refuse("probe_loss", "must be 'retain' with the rise budget (--lr-max-rise > "
                                       "0): a rise of the forgetting or combined loss relative "
                                       "to its value is no measure of damage (with gradient "
                                       "ascent the combined loss sits near 0); use "
                                       "--lr-max-rise 0 (GeN's rule) with that probe")
        if self.enabled and self.max_rise > 0.0 and 1.0 not in self.multiples:
            self._refuse("multiples", "must contain 1 (the step taken) when --lr-max-rise > 0")
        if not (self.backtrack_rise >= self.max_rise and math.isfinite(self.backtrack_rise)):
            self._refuse("backtrack_rise", f"must be finite and >= --lr-max-rise "
                                           f"({self.max_rise:g})")
        if not 0.0 < self.backtrack_factor < 1.0:
            self._refuse("backtrack_factor", "must be in (0, 1)")
        if int(self.max_backtracks) != self.max_backtracks or self.max_backtracks < 1:
            self._refuse("max_backtracks", "must be an integer >= 1")
        if not 0.0 <= self.min_r2 <= 1.0:
            self._refuse("min_r2", "must be in [0, 1]")
        if not (self.min_curvature_rel >= 0.0 and math.isfinite(self.min_curvature_rel)):
            self._refuse("min_curvature_rel", "must be finite and >= 0")
        self._validate_schedule()

    def _validate_multiples(self) -> None:
        if not all(math.isfinite(m) for m in self.multiples):
            self._refuse("multiples", "must all be finite")
        if len(set(self.multiples)) < 3:
            self._refuse("multiples", "needs at least 3 distinct values to fit a parabola")
        if 0.0 not in self.multiples:
            self._refuse("multiples", "must contain 0 (the loss before the step)")

    def _validate_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            self._refuse("schedule", f"must be one of {SCHEDULES}")
        if int(self.total_steps) != self.total_steps or self.total_steps < 0:
            self._refuse("total_steps", "must be an integer >= 0")
        if self.schedule != "constant" and self.total_steps <= 0:
            self._refuse("total_steps", f"must be > 0 for schedule {self.schedule!r}")
        if not 0.0 <= self.min_schedule_factor <= 1.0:
            self._refuse("min_schedule_factor", "must be in [0, 1]")


@dataclass
class FitResult:
    """One parabola fit and what it did to the rate; ``to_dict()`` is JSON-serialisable.

    Non-finite losses (and then curvature/slope/intercept, which are NaN) serialise as
    NaN/Infinity, which Python's json module writes and reads back.
    """

    multiples: list[float]
    losses: list[float]
    curvature: float
    slope: float
    intercept: float
    r2: float | None
    optimal_multiple: float | None  # s* = -slope / (2 * curvature) when accepted
    accepted: bool
    reason: str  # "accepted" or why the fit was refused
    lr_before: float
    lr_after: float
    # what set lr_after: "fit" (GeN's s*), "rise budget", "backtrack" or "kept" (refused)
    rule: str = "fit"
    step_multiple: float = 1.0  # the step just taken was shortened to this multiple of itself
    backtrack_losses: list[float] | None = None  # probe loss at each backtracking try
    refit_next: bool = False  # fit again right after the next step

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AdaptiveLRState:
    """What the fitted rate carries across steps and checkpoints."""

    lr: float  # fitted base rate, before the schedule factor
    num_fits: int = 0
    num_accepted: int = 0  # fits GeN's checks accepted (the rule that set the rate may differ)
    num_rejected: int = 0  # fits GeN's checks refused (the rise budget may still set the rate)
    last_fit: dict | None = None  # the last FitResult as a dict
    num_backtracks: int = 0  # fits that shortened the step just taken
    refit_next: bool = False  # the last fit asked for a fit right after the next step

    def to_dict(self) -> dict:
        return {
            "lr": float(self.lr),
            "num_fits": int(self.num_fits),
            "num_accepted": int(self.num_accepted),
            "num_rejected": int(self.num_rejected),
            "last_fit": None if self.last_fit is None else dict(self.last_fit),
            "num_backtracks": int(self.num_backtracks),
            "refit_next": bool(self.refit_next),
        }

    @classmethod
    def from_dict(cls, d: dict) -> AdaptiveLRState:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown AdaptiveLRState keys: {sorted(unknown)}")
        last_fit = d.get("last_fit")
        return cls(
            lr=float(d["lr"]),
            num_fits=int(d.get("num_fits", 0)),
            num_accepted=int(d.get("num_accepted", 0)),
            num_rejected=int(d.get("num_rejected", 0)),
            last_fit=None if last_fit is None else dict(last_fit),
            num_backtracks=int(d.get("num_backtracks", 0)),
            refit_next=bool(d.get("refit_next", False)),
        )


def fit_parabola(
    multiples: list[float], losses: list[float]
) -> tuple[float, float, float, float | None]:
    """Least-squares fit ``loss ~ curvature*s^2 + slope*s + intercept`` in float64.

    Exact (up to rounding) for 3 distinct points. Returns ``(curvature, slope, intercept, r2)``;
    ``r2`` is None for exactly 3 points, where the fit interpolates and says nothing about
    quality. With more points, r2 is 1 - SS_res/SS_tot (1.0 when all losses are equal).
    """
    s = torch.tensor([float(m) for m in multiples], dtype=torch.float64)
    y = torch.tensor([float(v) for v in losses], dtype=torch.float64)
    if s.ndim != 1 or s.numel() != y.numel():
        raise ValueError(
            f"need as many losses as multiples, got {len(losses)} and {len(multiples)}"
        )
    if torch.unique(s).numel() < 3:
        raise ValueError(f"need at least 3 distinct multiples, got {list(multiples)}")
    # Subtracting the mean loss first keeps the small differences that carry the curvature
    # from being rounded against a large loss value; it only shifts the intercept.
    y_mean = y.mean()
    y_centred = y - y_mean
    vandermonde = torch.stack([s * s, s, torch.ones_like(s)], dim=1)
    solution = torch.linalg.lstsq(vandermonde, y_centred.unsqueeze(1), driver="gelsd").solution
    curvature, slope, intercept_centred = (float(v) for v in solution.squeeze(1))
    intercept = intercept_centred + float(y_mean)
    r2 = None
    if s.numel() > 3:
        residual = y_centred - vandermonde @ solution.squeeze(1)
        ss_res = float((residual * residual).sum())
        ss_tot = float((y_centred * y_centred).sum())
        r2 = 1.0 if ss_tot == 0.0 else 1.0 - ss_res / ss_tot
    return curvature, slope, intercept, r2


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
    budget = rise_budget(config, loss_before)
    discriminant = slope * slope + 4.0 * curvature * budget
    if discriminant < 0.0:  # a concave parabola whose peak stays below the budget
        return math.inf
    if slope > 0.0 or (curvature > 0.0 and slope == 0.0):
        # The root nearest 0, written without the cancellation of (-b + sqrt(D)) / 2a when
        # the curvature is tiny (a near-linear profile).
        return 2.0 * budget / (slope + math.sqrt(discriminant))
    if curvature > 0.0:  # downhill first, then up through L(0) + budget beyond 2 s*
        return (-slope + math.sqrt(discriminant)) / (2.0 * curvature)
    return math.inf  # downhill and not convex: never rises ahead


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
