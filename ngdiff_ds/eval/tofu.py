"""TOFU evaluation of a ZeRO-3 engine: forget / retain / real-authors / world-facts metrics,
forget quality, model utility, the memorisation metrics and the QA-side membership attacks.

Metric names and quantities follow open-unlearning's TOFU results files
(``forget_Q_A_Prob``, ``forget_truth_ratio``, ``retain_Q_A_ROUGE``, ``wf_Q_A_Prob_normalised``,
``ra_Truth_Ratio``, ``forget_quality``, ``model_utility``, ``extraction_strength`` ...), so
published reference results can be dropped in beside ours. The correct answer of each set is
the references' (``../shared/eval-fidelity.md``): the paraphrased answer for the forget and
retain truth ratios, ``answer`` for real authors and world facts. The QA-side membership
attacks (forget vs the held-out authors' QA pairs) are named ``tofu_mia_*`` and
``tofu_privleak`` here, beside the text-based MUSE ones; ``TOFU_EVAL.json`` writes them under
open-unlearning's names (``ou_files``).
"""

from __future__ import annotations

import math

from ngdiff_ds.eval import attacks, metrics, text_metrics
from ngdiff_ds.eval.membership import membership_attacks
from ngdiff_ds.eval.results import MetricResult
from ngdiff_ds.eval.runner import answer_logprobs, answer_token_statistics, greedy_answers

# Which truth-ratio aggregate each set uses: forgetting wants R near 1 (can't tell true from
# false), keeping wants the true answer clearly more likely than the perturbed ones.
TRUTH_RATIO_FORM = {"forget": "closer_to_1", "retain": "true_better", "wf": "true_better",
                    "ra": "true_better"}
TRUTH_RATIO_NAME = {"forget": "forget_truth_ratio", "retain": "retain_Truth_Ratio",
                    "wf": "wf_Truth_Ratio", "ra": "ra_Truth_Ratio"}
# The answer the perturbed ones are measured against (TOFU's base_answer_key).
CORRECT_ANSWER = {"forget": "paraphrased_answer", "retain": "paraphrased_answer",
                  "wf": "answer", "ra": "answer"}
# TOFU's model utility: the harmonic mean of these 9 (retain, real authors, world facts).
UTILITY_INPUTS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
                  "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
                  "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")
QA_SETS = ("forget", "retain", "ra", "wf")


def _sums_and_counts(engine, tokenizer, pairs, settings):
    scored = answer_logprobs(engine, tokenizer, pairs, settings["max_length"],
                             settings["batch_size"])
    return [s for s, _ in scored], [n for _, n in scored]


def _evaluate_set(prefix: str, records: list[dict], engine, tokenizer,
                  settings) -> tuple[dict[str, MetricResult], list[dict] | None]:
    """The set's metrics, and (forget set) its per-token statistics for the attacks."""
    questions = [r["question"] for r in records]
    answers = [r["answer"] for r in records]
    out, token_stats = {}, None
    if prefix == "forget":
        # One teacher-forced pass gives the answer probability, the memorisation metrics
        # and the membership scores.
        token_stats = answer_token_statistics(engine, tokenizer, list(zip(questions, answers)),
                                              settings["max_length"], settings["batch_size"])
        sums = [math.fsum(row["logprobs"]) for row in token_stats]
        counts = [len(row["logprobs"]) for row in token_stats]
        # OU scores every answer token but the last (the eos) for these two.
        matches = [row["matches"][:-1] or row["matches"] for row in token_stats]
        out["extraction_strength"] = attacks.extraction_strength(matches)
        out["exact_memorization"] = attacks.exact_memorization(matches)
    else:
        sums, counts = _sums_and_counts(engine, tokenizer, list(zip(questions, answers)), settings)
    out[f"{prefix}_Q_A_Prob"] = metrics.answer_probability(sums, counts)
    generations = greedy_answers(engine, tokenizer, questions, settings["max_new_tokens"],
                                 settings["batch_size"])
    out[f"{prefix}_Q_A_ROUGE"] = metrics.rouge_l_recall(generations, answers, inputs=questions)
    if prefix in ("forget", "retain"):
        # MUSE's KnowMem computed on TOFU's QA pairs and prompt (ROUGE-L F1 where TOFU takes
        # recall); MUSE's own KnowMem needs its knowmem split and few-shot prompt (muse.py).
        out[f"{prefix}_qa_knowmem_ROUGE"] = text_metrics.knowledge_memorisation(
            generations, answers, use_stemmer=settings["use_stemmer"], inputs=questions)
    if not all(r.get("perturbed_answer") for r in records):
        return out, token_stats
    per_example = [len(r["perturbed_answer"]) for r in records]
    pert_sums, pert_counts = _sums_and_counts(
        engine, tokenizer, [(r["question"], p) for r in records for p in r["perturbed_answer"]],
        settings)
    pert_sums, pert_counts = _split(pert_sums, per_example), _split(pert_counts, per_example)
    out[f"{prefix}_Q_A_PERT_Prob"] = metrics.option_probabilities(pert_sums, pert_counts)
    if CORRECT_ANSWER[prefix] == "answer":
        correct_sums, correct_counts = sums, counts
        # Real authors and world facts are scored as multiple choice: the true answer against
        # the perturbed ones (TOFU's option sets differ only in the fact).
        out[f"{prefix}_Q_A_Prob_normalised"] = metrics.normalised_probability(
            sums, counts, pert_sums, pert_counts)
    else:
        if not all(r.get("paraphrased_answer") for r in records):
            return out, token_stats
        correct_sums, correct_counts = _sums_and_counts(
            engine, tokenizer, [(r["question"], r["paraphrased_answer"]) for r in records],
            settings)
        out[f"{prefix}_Q_A_PARA_Prob"] = metrics.answer_probability(correct_sums, correct_counts)
    out[TRUTH_RATIO_NAME[prefix]] = metrics.truth_ratio(
        correct_sums, correct_counts, pert_sums, pert_counts, form=TRUTH_RATIO_FORM[prefix])
    return out, token_stats


def _split(values: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for size in sizes:
        out.append(values[start:start + size])
        start += size
    return out


def qa_text(record: dict) -> str:
    """What zlib compresses for a QA pair: its scored tokens decoded, i.e. the answer
    (open-unlearning decodes the labelled tokens, special tokens skipped)."""
    return record["answer"]


def evaluate_tofu(engine, tokenizer, sets: dict[str, list[dict]], reference=None,
                  max_length: int = 256, batch_size: int = 32, max_new_tokens: int = 200,
                  use_stemmer: bool = False) -> tuple[dict[str, MetricResult], list[str]]:
    """All TOFU metrics for the sets given (keys among "forget", "retain", "ra", "wf",
    "holdout"), and notes on what could not be computed.

    Every rank must call this (scoring and generation are collective); every rank gets the
    results. ``reference`` (``suite.Reference``): the retain-only model's per-example forget
    truth ratios (forget quality), its QA-side Min-K% AUC (``tofu_privleak``) and per-example
    NLLs (``tofu_mia_reference``); without it those are missing. ``use_stemmer``: for the
    QA-based KnowMem only (TOFU's ROUGE always stems, as TOFU and open-unlearning do).
    """
    settings = {"max_length": max_length, "batch_size": batch_size,
                "max_new_tokens": max_new_tokens, "use_stemmer": use_stemmer}
    results, notes, forget_stats = {}, [], None
    for prefix in QA_SETS:
        if prefix in sets:
            set_results, stats = _evaluate_set(prefix, sets[prefix], engine, tokenizer, settings)
            results.update(set_results)
            forget_stats = stats if prefix == "forget" else forget_stats
    ratios = getattr(reference, "forget_truth_ratios", None)
    if ratios is not None and "forget_truth_ratio" in results:
        results["forget_quality"] = metrics.forget_quality(results["forget_truth_ratio"], ratios)
    present = {name: results[name] for name in UTILITY_INPUTS if name in results}
    if len(present) == len(UTILITY_INPUTS):
        results["model_utility"] = metrics.model_utility(present)
    elif present:
        missing = [name for name in UTILITY_INPUTS if name not in present]
        # Not TOFU's number: under its own key, so it is never compared with a published one.
        results["model_utility_partial"] = metrics.model_utility(present)
        notes.append(f"note: model_utility needs TOFU's 9 components; {len(missing)} missing "
                     f"({', '.join(missing)}): the harmonic mean of the other {len(present)} "
                     "is model_utility_partial")
    if forget_stats is not None and "holdout" in sets:
        holdout_stats = answer_token_statistics(
            engine, tokenizer, [(r["question"], r["answer"]) for r in sets["holdout"]],
            max_length, batch_size)
        attacks = membership_attacks(
            forget_stats, holdout_stats, [qa_text(r) for r in sets["forget"]],
            [qa_text(r) for r in sets["holdout"]],
            reference_nll=getattr(reference, "tofu_nll", None),
            reference_auc=getattr(reference, "tofu_mia_auc", None), drop_last_for_tokenwise=True)
        results.update({f"tofu_{name}": value for name, value in attacks.items()})
    elif "forget" in sets:
        notes.append("note: no held-out QA split (TOFU's holdout): no QA-side membership "
                     "attacks or tofu_privleak")
    return results, notes


def forget_truth_ratios_of(results: dict) -> list[float] | None:
    """The per-example forget truth ratios in a results mapping (ours or open-unlearning's,
    read from a ``*_results.json``), in example order; None when it has no such entry."""
    if "forget_truth_ratio" not in results:
        return None
    by_index = results["forget_truth_ratio"]["value_by_index"]
    scores = [by_index[k]["score"] for k in sorted(by_index, key=int)]
    return [math.nan if score is None else float(score) for score in scores]  # null: NaN
