"""MUSE-style evaluation of a ZeRO-3 engine on text: verbatim memorisation and the Min-K%
membership test behind PrivLeak.

KnowMem (ROUGE of greedy answers to forget and retain QA pairs) shares its generations with
TOFU's ROUGE and is computed in ``eval/tofu.py`` (with TOFU's prompt, not MUSE's few-shot
one). Metric names follow open-unlearning's MUSE results files: ``forget_verbmem_ROUGE``,
``forget_knowmem_ROUGE``, ``retain_knowmem_ROUGE``, ``mia_min_k`` (the AUC) and ``privleak``;
the per-text Min-K% scores are kept as ``forget_text_min_k`` and ``holdout_text_min_k``.
ROUGE is computed without stemming, as MUSE's own code does (open-unlearning stems), so
dropped-in open-unlearning VerbMem/KnowMem values can differ slightly.
"""

from __future__ import annotations

import math

from ngdiff_ds.eval import text_metrics as metrics
from ngdiff_ds.eval.results import MetricResult
from ngdiff_ds.eval.runner import greedy_continuations, text_token_logprobs

MIN_K_FRACTION = 0.4  # MUSE's k for the Min-K% attack


def evaluate_muse(engine, tokenizer, sets: dict[str, list[dict]],
                  reference_auc: float | None = None, max_length: int = 256, batch_size: int = 32,
                  verbmem_max_new_tokens: int = 128) -> dict[str, MetricResult]:
    """The MUSE text metrics for the sets given.

    ``sets``: ``"verbmem"`` (records with ``prompt`` and ``gt``) gives VerbMem;
    ``"forget_text"`` and ``"holdout_text"`` (records with ``text``) give the Min-K% AUC of
    forget (members) against held-out text, and with ``reference_auc`` (the retain-only
    model's ``mia_min_k``) PrivLeak. Every rank must call this (scoring and generation are
    collective); every rank gets the results.
    """
    results = {}
    if "verbmem" in sets:
        records = sets["verbmem"]
        continuations = greedy_continuations(engine, tokenizer, [r["prompt"] for r in records],
                                             verbmem_max_new_tokens, batch_size)
        results["forget_verbmem_ROUGE"] = metrics.verbatim_memorisation(
            continuations, [r["gt"] for r in records])
    if "forget_text" in sets and "holdout_text" in sets:
        scores = {}
        for name in ("forget_text", "holdout_text"):
            token_logprobs = text_token_logprobs(engine, tokenizer, [r["text"] for r in sets[name]],
                                                 max_length, batch_size)
            scores[name] = metrics.min_k_percent_scores(token_logprobs, MIN_K_FRACTION)
            results[f"{name}_min_k"] = scores[name]
        if any(math.isnan(s.agg_value) for s in scores.values()):
            # A model that scores NaN has no ranking to measure: report it, do not stop the run.
            results["mia_min_k"] = MetricResult(math.nan)
        else:
            results["mia_min_k"] = metrics.auc(scores["forget_text"], scores["holdout_text"])
        if reference_auc is not None:
            results["privleak"] = metrics.privleak(results["mia_min_k"], reference_auc)
    return results


def mia_auc_of(results: dict) -> float | None:
    """The ``mia_min_k`` AUC in a results mapping (ours or open-unlearning's, read from a
    ``*_results.json``); None when it has none (a TOFU-only results file)."""
    entry = results.get("mia_min_k")
    if entry is None:
        return None
    return math.nan if entry["agg_value"] is None else float(entry["agg_value"])  # null: NaN
