"""Picking the best evaluation point (eval/selection.py), by hand."""

from __future__ import annotations

import pytest

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.eval.selection import best_point, score

POINTS = [
    {"label": "before", "forget_quality": 1e-6, "model_utility": 0.60},
    {"label": "step10", "forget_quality": 0.02, "model_utility": 0.59},
    {"label": "step20", "forget_quality": 0.30, "model_utility": 0.55},  # 0.55 < 0.95 * 0.60
    {"label": "final", "forget_quality": 0.90, "model_utility": 0.10},
]


def test_fq_mu_is_the_mean_and_never_the_starting_model():
    assert score("fq_mu", POINTS[2], POINTS[0]) == pytest.approx((0.30 + 0.55) / 2)
    point, value = best_point("fq_mu", POINTS)
    assert point["label"] == "final" and value == pytest.approx(0.50)  # 0.5 vs 0.425 vs 0.305
    # even when every unlearned point is worse than the start
    worse = [{"label": "before", "forget_quality": 0.9, "model_utility": 0.9},
             {"label": "final", "forget_quality": 0.0, "model_utility": 0.1}]
    assert best_point("fq_mu", worse)[0]["label"] == "final"


def test_fq_keep_mu_keeps_95_percent_of_the_starting_utility():
    # 0.95 * 0.60 = 0.57: only step10 keeps enough
    assert score("fq_keep_mu", POINTS[2], POINTS[0]) is None
    assert best_point("fq_keep_mu", POINTS) == (POINTS[1], 0.02)
    assert best_point("fq_keep_mu", [POINTS[0], POINTS[3]]) is None


def test_partial_utility_counts_and_missing_metrics_do_not():
    points = [{"label": "before", "forget_quality": 0.1, "model_utility_partial": 0.5},
              {"label": "final", "forget_quality": 0.2, "model_utility_partial": 0.5},
              {"label": "step5", "model_utility": 0.9}]  # no reference: no forget quality
    assert best_point("fq_mu", points)[0]["label"] == "final"
    assert best_point("fq_keep_mu", points)[1] == 0.2


def test_a_tie_goes_to_the_earlier_point():
    points = [{"label": "step10", "forget_quality": 0.2, "model_utility": 0.4},
              {"label": "step20", "forget_quality": 0.4, "model_utility": 0.2}]
    assert best_point("fq_mu", points)[0]["label"] == "step10"


def test_an_unknown_rule_names_the_flag_and_the_rules():
    with pytest.raises(ConfigError, match="--select-best 'fq'.*fq_mu.*fq_keep_mu"):
        score("fq", POINTS[1], POINTS[0])


def test_a_nan_metric_gives_no_score_and_never_sticks():
    nan = float("nan")
    points = [{"label": "before", "forget_quality": 0.1, "model_utility": 0.5},
              {"label": "step10", "forget_quality": nan, "model_utility": 0.5},
              {"label": "final", "forget_quality": 0.8, "model_utility": 0.4}]
    assert score("fq_mu", points[1], points[0]) is None
    assert best_point("fq_mu", points)[0]["label"] == "final"
    # a NaN starting utility lets no point through fq_keep_mu (rather than every one)
    points[0]["model_utility"] = nan
    assert best_point("fq_keep_mu", points) is None
