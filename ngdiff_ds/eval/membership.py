"""The membership attacks of one pair of sets (forget = members, held-out = non-members), as
open-unlearning reports them, from the runner's per-token statistics. Pure: no model.

Used twice per evaluation: on texts (MUSE: forget passages vs held-out passages; the
results' ``mia_*``) and on QA pairs (TOFU: forget QA vs the held-out authors' QA, OU's TOFU
``holdout`` split; the results' ``tofu_mia_*``). Each attack is an entry in OU's layout
(``attacks.mia_result``: ``forget``, ``holdout``, ``auc``, ``agg_value`` = the AUC,
P(a forget example looks more familiar than a held-out one)):

- ``mia_loss``: mean token NLL; ``mia_zlib``: that over the zlib-compressed length of the
  text; ``mia_reference``: the target's NLL minus the retain-only model's (from the
  reference's own ``mia_loss`` entry, so no second model is kept): every scored token;
- ``mia_min_k`` (k = 0.4) and ``mia_min_k_plus_plus`` (each token's log-prob standardised by
  the mean and spread of log-probs under the model's own next-token distribution): OU drops
  the last labelled token for these (``tokenwise_logprobs``). On QA pairs that token is the
  answer's eos, and it is dropped here too; on texts the runner has already dropped the eos
  that training appends, and the last word is kept as MUSE's own Min-K% keeps it;
- ``privleak`` (with the retain-only model's Min-K% AUC): OU's
  ``(s - r) / r * 100`` with ``s = 1 - auc``, ``r = 1 - auc_retain``.
"""

from __future__ import annotations

import math

import numpy as np

from ngdiff_ds.eval import attacks, text_metrics
from ngdiff_ds.eval.results import scores_of

MIN_K_FRACTION = 0.4  # MUSE's and OU's k


def membership_attacks(forget_stats: list[dict], holdout_stats: list[dict],
                       forget_texts: list[str], holdout_texts: list[str],
                       reference_nll: dict | None = None, reference_auc: float | None = None,
                       drop_last_for_tokenwise: bool = False) -> dict:
    """Every attack for the two sets. ``*_stats``: per example the runner's ``logprobs``,
    ``mu`` and ``sigma`` lists; ``*_texts``: what zlib compresses; ``reference_nll``:
    ``{"forget": [...], "holdout": [...]}`` per-example mean NLL of the retain-only model;
    ``drop_last_for_tokenwise``: drop the last scored token for Min-K% and Min-K%++ (QA pairs:
    the eos)."""
    sets = {"forget": (forget_stats, forget_texts), "holdout": (holdout_stats, holdout_texts)}
    scores = {name: {} for name in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")}
    for part, (stats, texts) in sets.items():
        logprobs = [row["logprobs"] for row in stats]
        cut = [slice(None, -1) if drop_last_for_tokenwise else slice(None)] * len(stats)
        tokenwise = [row["logprobs"][c] for row, c in zip(stats, cut)]
        scores["mia_loss"][part] = attacks.loss_scores(logprobs)
        scores["mia_zlib"][part] = attacks.zlib_scores(logprobs, texts)
        scores["mia_min_k"][part] = text_metrics.min_k_percent_scores(tokenwise, MIN_K_FRACTION)
        scores["mia_min_k_plus_plus"][part] = attacks.min_k_plus_plus_scores(
            tokenwise, [row["mu"][c] for row, c in zip(stats, cut)],
            [row["sigma"][c] for row, c in zip(stats, cut)], MIN_K_FRACTION)
    if reference_nll is not None and all(
            len(reference_nll[part]) == len(sets[part][0]) for part in sets):
        scores["mia_reference"] = {
            part: reference_scores_from_nll([row["logprobs"] for row in sets[part][0]],
                                            reference_nll[part])
            for part in sets}
    results = {name: _entry(parts["forget"], parts["holdout"]) for name, parts in scores.items()}
    if reference_auc is not None and results["mia_min_k"]["auc"] is not None:
        results["privleak"] = text_metrics.privleak(results["mia_min_k"]["auc"], reference_auc)
    return results


def reference_scores_from_nll(target_token_logprobs: list[list[float]],
                              reference_mean_nll: list[float]) -> np.ndarray:
    """Member-oriented ``mia_reference`` scores: reference mean NLL - target mean NLL, per
    example (OU's statistic is the negative: target minus reference)."""
    target_nll = np.array([-np.mean(row) for row in target_token_logprobs], dtype=np.float64)
    return np.asarray(reference_mean_nll, dtype=np.float64) - target_nll


def _entry(forget_scores, holdout_scores) -> dict:
    """OU's layout; a model whose scores are NaN has no ranking: the AUC is null, the run goes on."""
    forget = scores_of(forget_scores, "forget_scores")
    holdout = scores_of(holdout_scores, "holdout_scores")
    if np.isnan(forget).any() or np.isnan(holdout).any():
        return {"forget": {"agg_value": None}, "holdout": {"agg_value": None}, "auc": None,
                "agg_value": None}
    return attacks.mia_result(forget, holdout)


def mia_auc_of(results: dict, name: str = "mia_min_k") -> float | None:
    """The AUC of attack ``name`` in a results mapping (ours or open-unlearning's); None when
    it has none, NaN when it is null."""
    entry = results.get(name)
    if entry is None:
        return None
    return math.nan if entry["agg_value"] is None else float(entry["agg_value"])


def per_example_nll_of(part: dict) -> list[float]:
    """The per-example statistic of one side (``forget`` / ``holdout``) of a ``mia_loss``
    entry: the mean token NLL, in example order."""
    by_index = part["value_by_index"]
    return [math.nan if by_index[k]["score"] is None else float(by_index[k]["score"])
            for k in sorted(by_index, key=int)]
