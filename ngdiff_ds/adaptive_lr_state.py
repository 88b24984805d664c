"""What the adaptive learning rate is told and what it carries: ``AdaptiveLRConfig`` (the
settings, each with its flag, validated), ``FitResult`` (one fit, logged) and
``AdaptiveLRState`` (the rate and counters, in checkpoints). The rules are in adaptive_lr.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.settings import flag_of, option

PROBE_LOSSES = ("retain", "forget", "both")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class AdaptiveLRConfig:
    """Settings of the parabola-fit rate; invalid values raise ConfigError naming the flag."""

    enabled: bool = option(True, flag="--no-adaptive-lr",
                           help="keep the learning rate fixed (times --lr-schedule)")
    # phi: fit every `period` steps (8 keeps the probe cost under ~10 %)
    period: int = option(8, flag="--lr-period", help="phi: fit the rate every this many steps")
    probe_loss: str = option("retain", choices=PROBE_LOSSES,
                             help="the loss measured along the step: retain (the retain set's NLL, "
                                  "whichever --retain-loss trains), forget (the forgetting "
                                  "loss) or both (their sum)")
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
