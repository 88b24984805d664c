"""TOFU evaluation of a ZeRO-3 engine: forget / retain / world-facts metrics, forget quality,
model utility, and MUSE's KnowMem, which shares the QA generations.

Metric names follow the open-unlearning TOFU results files (``forget_Q_A_Prob``,
``forget_truth_ratio``, ``retain_Q_A_ROUGE``, ``wf_Q_A_Prob_normalised``, ``forget_quality``,
``model_utility`` ...), so published reference results can be dropped in beside ours.
"""

from __future__ import annotations

import math

from ngdiff_ds.eval import metrics, text_metrics
from ngdiff_ds.eval.results import MetricResult
from ngdiff_ds.eval.runner import answer_logprobs, greedy_answers

# Which truth-ratio aggregate each set uses: forgetting wants R near 1 (can't tell true from
# false), keeping wants the true answer clearly more likely than the perturbed ones.
TRUTH_RATIO_FORM = {"forget": "closer_to_1", "retain": "true_better", "wf": "true_better"}
TRUTH_RATIO_NAME = {"forget": "forget_truth_ratio", "retain": "retain_Truth_Ratio",
                    "wf": "wf_Truth_Ratio"}
UTILITY_INPUTS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
                  "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")


def _score_pairs(engine, tokenizer, pairs, settings):
    scored = answer_logprobs(engine, tokenizer, pairs, settings["max_length"],
                             settings["batch_size"])
    return [s for s, _ in scored], [n for _, n in scored]


def _evaluate_set(prefix: str, records: list[dict], engine, tokenizer,
                  settings) -> dict[str, MetricResult]:
    questions = [r["question"] for r in records]
    answers = [r["answer"] for r in records]
    out = {}
    sums, counts = _score_pairs(engine, tokenizer, list(zip(questions, answers)), settings)
    has_options = all(r.get("paraphrased_answer") and r.get("perturbed_answer") for r in records)
    if prefix != "wf" or not has_options:
        out[f"{prefix}_Q_A_Prob"] = metrics.answer_probability(sums, counts)
    generations = greedy_answers(engine, tokenizer, questions, settings["max_new_tokens"],
                                 settings["batch_size"])
    out[f"{prefix}_Q_A_ROUGE"] = metrics.rouge_l_recall(generations, answers)
    if prefix in ("forget", "retain"):
        # MUSE's KnowMem on the same generations: ROUGE-L F1 where TOFU takes recall.
        out[f"{prefix}_knowmem_ROUGE"] = text_metrics.knowledge_memorisation(generations, answers)
    if has_options:
        para_sums, para_counts = _score_pairs(
            engine, tokenizer, [(r["question"], r["paraphrased_answer"]) for r in records],
            settings)
        per_example = [len(r["perturbed_answer"]) for r in records]
        pert_sums, pert_counts = _score_pairs(
            engine, tokenizer, [(r["question"], p) for r in records for p in r["perturbed_answer"]],
            settings)
        if prefix == "wf":
            # General facts are scored as multiple choice: the paraphrased true answer against
            # the perturbed ones, which share its sentence template (TOFU's option sets differ
            # only in the fact too).
            out["wf_Q_A_Prob_normalised"] = metrics.normalised_probability(
                para_sums, para_counts, _split(pert_sums, per_example),
                _split(pert_counts, per_example))
        out[TRUTH_RATIO_NAME[prefix]] = metrics.truth_ratio(
            para_sums, para_counts, _split(pert_sums, per_example), _split(pert_counts, per_example),
            form=TRUTH_RATIO_FORM[prefix])
    return out


def _split(values: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for size in sizes:
        out.append(values[start:start + size])
        start += size
    return out


def evaluate_tofu(engine, tokenizer, sets: dict[str, list[dict]],
                  reference_forget_truth_ratios=None, max_length: int = 256, batch_size: int = 32,
                  max_new_tokens: int = 48) -> dict[str, MetricResult]:
    """All TOFU metrics for the sets given (keys among "forget", "retain", "wf").

    Every rank must call this (scoring and generation are collective); every rank gets the
    results. ``reference_forget_truth_ratios``: the retain-only model's per-example forget
    truth ratios (a ``forget_truth_ratio`` result or a list); without it there is no forget
    quality.
    """
    settings = {"max_length": max_length, "batch_size": batch_size, "max_new_tokens": max_new_tokens}
    results = {}
    for prefix, records in sets.items():
        results.update(_evaluate_set(prefix, records, engine, tokenizer, settings))
    if reference_forget_truth_ratios is not None and "forget_truth_ratio" in results:
        results["forget_quality"] = metrics.forget_quality(results["forget_truth_ratio"],
                                                           reference_forget_truth_ratios)
    utility_inputs = {name: results[name] for name in UTILITY_INPUTS if name in results}
    if utility_inputs:
        results["model_utility"] = metrics.model_utility(utility_inputs)
    return results


def forget_truth_ratios_of(results: dict) -> list[float] | None:
    """The per-example forget truth ratios in a results mapping (ours or open-unlearning's,
    read from a ``*_results.json``), in example order; None when it has no such entry."""
    if "forget_truth_ratio" not in results:
        return None
    by_index = results["forget_truth_ratio"]["value_by_index"]
    scores = [by_index[k]["score"] for k in sorted(by_index, key=int)]
    return [math.nan if score is None else float(score) for score in scores]  # null: NaN
