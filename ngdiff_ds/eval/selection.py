"""Which evaluation point of a run is its best, by a named rule (pure Python).

A point is an evaluation summary (``forget_quality``, ``model_utility``, ...) with its
``label`` (``before``, ``step20``, ``final``) as ``RunEvaluation.points`` keeps them. The
candidates are the points after unlearning began: ``before`` is the starting model, which a
rule would otherwise pick whenever unlearning hurt. Rules:

- ``fq_mu``: the mean of forget quality and model utility, as users of TOFU ask for;
- ``fq_keep_mu``: the best forget quality among the points whose model utility is at least
  95 % of the starting model's (the rule benchmarks/compare_methods.py picks rates by).

Model utility is ``model_utility`` (TOFU's 9 components), else ``model_utility_partial``.
A missing or non-finite metric gives the point no score. A tie goes to the earlier point
(less unlearning for the same score).
"""

from __future__ import annotations

import math

from ngdiff_ds.errors import ConfigError

KEEP_UTILITY = 0.95  # fq_keep_mu: the fraction of the starting model's utility to keep
RULES = {
    "fq_mu": "mean of forget quality and model utility",
    "fq_keep_mu": f"best forget quality with model utility >= {KEEP_UTILITY:.0%} of the "
                  "starting model's",
}


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ConfigError(f"--select-best {rule!r} is not a rule; known: "
                          + "; ".join(f"{name} ({about})" for name, about in RULES.items()))


def model_utility(point: dict) -> float | None:
    return point.get("model_utility", point.get("model_utility_partial"))


def score(rule: str, point: dict, before: dict | None) -> float | None:
    """The point's score under ``rule`` (higher is better), None when it has no score: a
    metric is missing, or (fq_keep_mu) it lost more utility than allowed."""
    check_rule(rule)
    quality, utility = _finite(point.get("forget_quality")), _finite(model_utility(point))
    if quality is None or utility is None:
        return None
    if rule == "fq_mu":
        return (quality + utility) / 2
    before_utility = _finite(model_utility(before)) if before else None
    if before_utility is None or utility < KEEP_UTILITY * before_utility:
        return None
    return quality


def _finite(value) -> float | None:
    """``value`` as a float when it is a finite number; None for a missing, NaN or infinite
    metric (a NaN would win or lose every comparison and stick)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def best_point(rule: str, points: list[dict]) -> tuple[dict, float] | None:
    """The best candidate point and its score, or None when no candidate has a score."""
    before = next((p for p in points if p.get("label") == "before"), None)
    best = None
    for point in points:
        if point.get("label") == "before":
            continue
        value = score(rule, point, before)
        if value is not None and (best is None or value > best[1]):
            best = (point, value)
    return best
