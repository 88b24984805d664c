"""Adaptive learning rate by a parabola fit along the last step (GeN, Bu & Xu, arXiv 2407.02772).

After a step with rate ``lr`` moved the weights by ``delta`` (for SGD and AdamW ``delta`` is
linear in ``lr``), the engine evaluates a probe loss ``L(s) = loss(theta_old + s * delta)`` at a
few step multiples ``s`` (default ``-1, 0, +1``; ``L(+1)`` is the loss at the current weights;
the loop measures them on the next step's batch, see lr_probe.py). This module turns those numbers
into the next rate; it is pure Python plus a float64 ``torch.linalg.lstsq`` and knows nothing of
DeepSpeed (``settings.option`` only declares each field's command-line flag).

The fit ``L(s) ~ curvature * s**2 + slope * s + intercept`` has its minimum at
``s* = -slope / (2 * curvature)``: the step that would have been best is ``s*`` times the one
taken, so the rate that would have produced it is ``s* * lr``. It is used only when the
parabola is trustworthy:

1. every loss is finite ("non-finite loss");
2. with more than 3 points, the fit explains the data, ``r2 >= min_r2`` ("poor fit (r2=...)").
   Checked before the shape tests because a badly fitting parabola's curvature and slope mean
   nothing, and "poor fit" is then the reason worth reporting;
3. the curvature is positive, i.e. above ``min_curvature_rel * (|L(0)| + 1e-12)``
   ("non-positive curvature"); the relative floor refuses profiles that are flat up to noise,
   whose ``s*`` would be arbitrary;
4. the optimum lies ahead, ``s* > 0`` (equivalently ``slope < 0``) ("not downhill").

Accepted: ``proposal = clip(s* * lr, clip_low * lr, clip_high * lr)`` and
``lr <- (1 - beta) * lr + beta * proposal`` with ``beta = smoothing``. A rate that is too large
shows up as ``L(+1) > L(0)`` with positive curvature and ``0 < s* < 1``: that is accepted and
shrinks the rate, so overshooting is corrected by the fit itself.

Refusal policy: a refused fit leaves the rate unchanged (as GeN does), including "not downhill".
Shrinking on "not downhill" was considered and rejected: the NGDiff direction serves two tasks
while the probe loss measures one (by default the retain loss), so an uphill probe can be the
intended trade-off of the step rather than a sign of overshooting; shrinking on it would ratchet
the rate toward zero over a run. Genuine overshooting with a convex profile is already handled
by acceptance (``s*`` in ``(0, 1)``); a concave profile carries no information about the scale
of the step. The refusal is counted and its reason recorded so the trainer can log it.

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
been ``s*`` times longer gives ``base * s*`` as the new base.
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
                              help="beta in lr <- (1-beta) lr + beta clip(s* lr)")
    clip_low: float = option(0.1, flag="--lr-clip-low", help="proposal clipped to >= LOW lr")
    clip_high: float = option(10.0, flag="--lr-clip-high", help="proposal clipped to <= HIGH lr")
    warmup_steps: int = option(0, flag="--lr-warmup-steps", help="steps before the first fit")
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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AdaptiveLRState:
    """What the fitted rate carries across steps and checkpoints."""

    lr: float  # fitted base rate, before the schedule factor
    num_fits: int = 0
    num_accepted: int = 0
    num_rejected: int = 0
    last_fit: dict | None = None  # the last FitResult as a dict

    def to_dict(self) -> dict:
        return {
            "lr": float(self.lr),
            "num_fits": int(self.num_fits),
            "num_accepted": int(self.num_accepted),
            "num_rejected": int(self.num_rejected),
            "last_fit": None if self.last_fit is None else dict(self.last_fit),
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


def is_fit_step(config: AdaptiveLRConfig, step: int) -> bool:
    """Whether to fit right after optimizer step ``step`` (1-based: the count of completed steps).

    No fit during the first ``warmup_steps`` steps; then after step ``warmup_steps + 1`` and
    every ``period`` steps after it. Always False when the config is disabled.
    """
    if not config.enabled or step <= config.warmup_steps:
        return False
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


def _smoothed_rate(config: AdaptiveLRConfig, lr: float, optimal_multiple: float) -> float:
    proposal = min(max(optimal_multiple * lr, config.clip_low * lr), config.clip_high * lr)
    return (1.0 - config.smoothing) * lr + config.smoothing * proposal


def update(
    state: AdaptiveLRState, config: AdaptiveLRConfig, losses: list[float]
) -> tuple[AdaptiveLRState, FitResult]:
    """Fit the probe losses (in the order of ``config.multiples``) and return a new state.

    The input state is not modified. A refused fit keeps the rate and records the reason.
    """
    multiples = list(config.multiples)
    losses = [float(v) for v in losses]
    if len(losses) != len(multiples):
        raise ValueError(
            f"expected {len(multiples)} losses (one per multiple {multiples}), got {len(losses)}"
        )
    if not (math.isfinite(state.lr) and state.lr > 0.0):
        raise ValueError(f"state.lr must be finite and > 0, got {state.lr!r}")

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
    lr_after = _smoothed_rate(config, lr_before, optimal_multiple) if accepted else lr_before

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
    )
    new_state = AdaptiveLRState(
        lr=lr_after,
        num_fits=state.num_fits + 1,
        num_accepted=state.num_accepted + int(accepted),
        num_rejected=state.num_rejected + int(not accepted),
        last_fit=result.to_dict(),
    )
    return new_state, result
