"""TOFU unlearning metrics, as pure functions of numbers computed elsewhere.

Nothing here touches a model: the model side supplies, per example, the sum of the answer
tokens' log-probabilities and the number of answer tokens, per-token log-probabilities of a
text, or generated strings. Every function works in float64 on plain sequences, NumPy
arrays or (CPU or GPU, with or without grad) torch tensors.

TOFU (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"): answer
probability, normalised (multiple-choice) probability, ROUGE-L recall, truth ratio, forget
quality and model utility. The MUSE metrics are in ``text_metrics.py``; the results layout
(``MetricResult``) in ``results.py``.

Where the paper and the public code disagree, the default follows the code that produced
the published numbers, and the alternative is a parameter (see ``truth_ratios``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from scipy.special import logsumexp
from scipy.stats import ks_2samp

from ngdiff_ds.eval.results import (MetricResult, agg_of, as_float64, as_ragged, by_index,
                                    require_examples, require_same_length, rouge_l, scores_of)

TruthRatioForm = Literal["closer_to_1", "true_better"]
PerturbedMean = Literal["geometric", "arithmetic"]


def _per_token_logprobs(logprob_sums: np.ndarray, num_tokens: np.ndarray, name: str) -> np.ndarray:
    """log P(a|q) / |a|: the log of the length-normalised probability P(a|q)^(1/|a|)."""
    if logprob_sums.shape != num_tokens.shape:
        raise ValueError(
            f"{name}: log-prob sums and token counts differ in shape: "
            f"{logprob_sums.shape} != {num_tokens.shape}"
        )
    if np.any(num_tokens <= 0):
        raise ValueError(f"{name}: every answer needs at least one token")
    return logprob_sums / num_tokens


def _ragged_per_token_logprobs(logprob_sums: Any, num_tokens: Any, name: str) -> list[np.ndarray]:
    sums = as_ragged(logprob_sums, f"{name} log-prob sums")
    counts = as_ragged(num_tokens, f"{name} token counts")
    require_same_length(f"{name} log-prob sums", sums, f"{name} token counts", counts)
    return [_per_token_logprobs(s, c, f"{name}[{i}]") for i, (s, c) in enumerate(zip(sums, counts))]



def answer_probability(logprob_sums: Any, num_tokens: Any) -> MetricResult:
    """TOFU "Probability": the length-normalised probability of the ground-truth answer.

    Per example ``P(a|q)^(1/|a|) = exp(logprob_sum / num_tokens)``, i.e. exp(-mean token
    NLL); the aggregate is the mean over examples. Per-example keys: ``prob`` and
    ``avg_loss`` (the mean token NLL, which open-unlearning also stores).
    """
    sums = as_float64(logprob_sums, "logprob_sums")
    counts = as_float64(num_tokens, "num_tokens")
    require_examples(len(sums), "logprob_sums")
    per_token = _per_token_logprobs(sums, counts, "answer_probability")
    probs = np.exp(per_token)
    return MetricResult(float(probs.mean()), by_index(prob=probs, avg_loss=-per_token))


def option_probabilities(logprob_sums: Any, num_tokens: Any) -> MetricResult:
    """open-unlearning's ``*_Q_A_PERT_Prob``: the length-normalised probability of each of an
    example's options (the perturbed answers), ``exp(logprob_sum / num_tokens)`` each.

    ``logprob_sums`` / ``num_tokens``: one list per example (lengths may differ). Per example
    ``prob`` and ``avg_loss`` are lists, one value per option; aggregate: the mean over every
    option of every example.
    """
    require_examples(len(logprob_sums), "logprob_sums")
    per_token = _ragged_per_token_logprobs(logprob_sums, num_tokens, "options")
    if any(len(row) == 0 for row in per_token):
        raise ValueError("every example needs at least one option")
    rows = {str(i): {"prob": np.exp(row).tolist(), "avg_loss": (-row).tolist()}
            for i, row in enumerate(per_token)}
    return MetricResult(float(np.exp(np.concatenate(per_token)).mean()), rows)


def normalised_probability(
    correct_logprob_sums: Any,
    correct_num_tokens: Any,
    option_logprob_sums: Any,
    option_num_tokens: Any,
    length_normalise: bool = True,
) -> MetricResult:
    """TOFU "Probability" on the Real Authors and World Facts sets (multiple-choice form).

    Per example ``p_correct / (p_correct + sum_j p_wrong_j)`` where each ``p`` is the
    length-normalised answer probability ``exp(logprob_sum / num_tokens)`` (TOFU's code), or
    the raw ``exp(logprob_sum)`` when ``length_normalise=False``. ``option_*`` hold the wrong
    options, one list per example (lists may differ in length). Computed in log space so
    that long answers with tiny raw probabilities do not underflow to 0/0. Aggregate: mean.
    """
    correct_sums = as_float64(correct_logprob_sums, "correct_logprob_sums")
    correct_counts = as_float64(correct_num_tokens, "correct_num_tokens")
    require_examples(len(correct_sums), "correct_logprob_sums")
    # The per-token values are computed either way: that also checks the token counts.
    correct_log_p = _per_token_logprobs(correct_sums, correct_counts, "correct answers")
    option_log_p = _ragged_per_token_logprobs(option_logprob_sums, option_num_tokens, "options")
    if not length_normalise:
        correct_log_p = correct_sums
        option_log_p = as_ragged(option_logprob_sums, "option_logprob_sums")
    require_same_length("correct answers", correct_log_p, "options", option_log_p)

    probs = np.array([
        math.exp(log_c - logsumexp(np.concatenate([[log_c], log_options])))
        for log_c, log_options in zip(correct_log_p, option_log_p)
    ])
    return MetricResult(float(probs.mean()), by_index(prob=probs))


def rouge_l_recall(
    predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = True,
    inputs: Sequence[str] | None = None,
) -> MetricResult:
    """TOFU "ROUGE": ROUGE-L recall of greedy generations against the ground-truth answers.

    ``rouge_score``'s ``RougeScorer(["rougeL"], use_stemmer=True)``, ``score(target=reference,
    prediction=prediction).recall`` (as TOFU's code); recall because a correct answer buried in
    a longer generation should still count. Aggregate: mean. Per-example keys: ``rougeL_recall``
    and the other fields of ``results.rouge_l`` (``inputs``: the questions, kept beside them).
    """
    return rouge_l(predictions, references, "recall", use_stemmer, inputs)


def truth_ratios(
    paraphrased_logprob_sums: Any,
    paraphrased_num_tokens: Any,
    perturbed_logprob_sums: Any,
    perturbed_num_tokens: Any,
    *,
    perturbed_mean: PerturbedMean = "geometric",
) -> np.ndarray:
    """Per-example TOFU truth ratio R = (average perturbed probability) / (paraphrased probability).

    All probabilities are length-normalised, ``P(a|q)^(1/|a|)``. R < 1: the model prefers the
    (paraphrased) truth over the perturbed wrong answers; R near 1: it cannot tell them apart.

    ``perturbed_mean`` picks how the perturbed answers are averaged:

    * ``"geometric"`` (default): exp of the mean of their per-token log-probs. This is what
      TOFU's released code (``aggregate_eval_stat.py``: mean of the perturbed average losses)
      and open-unlearning compute, so published TOFU numbers use it.
    * ``"arithmetic"``: the plain mean of the probabilities, as the TOFU paper's formula
      writes it; computed as ``logmeanexp`` so that it does not underflow.

    Perturbed lists may differ in length between examples.
    """
    para_sums = as_float64(paraphrased_logprob_sums, "paraphrased_logprob_sums")
    para_counts = as_float64(paraphrased_num_tokens, "paraphrased_num_tokens")
    require_examples(len(para_sums), "paraphrased_logprob_sums")
    para_log_p = _per_token_logprobs(para_sums, para_counts, "paraphrased answers")
    pert_log_p = _ragged_per_token_logprobs(perturbed_logprob_sums, perturbed_num_tokens, "perturbed answers")
    require_same_length("paraphrased answers", para_log_p, "perturbed answers", pert_log_p)
    if any(len(row) == 0 for row in pert_log_p):
        raise ValueError("every example needs at least one perturbed answer")

    if perturbed_mean == "geometric":
        pert_avg_log_p = np.array([row.mean() for row in pert_log_p])
    elif perturbed_mean == "arithmetic":
        pert_avg_log_p = np.array([logsumexp(row) - math.log(len(row)) for row in pert_log_p])
    else:
        raise ValueError(f"perturbed_mean must be 'geometric' or 'arithmetic', got {perturbed_mean!r}")
    return np.exp(pert_avg_log_p - para_log_p)


def aggregate_truth_ratios(ratios: Any, form: TruthRatioForm) -> float:
    """TOFU's two aggregates of per-example truth ratios R.

    * ``"closer_to_1"`` (forget set): mean of ``min(R, 1/R)``. A model that never learnt the
      forget set cannot tell true from false there, so R near 1 (score near 1) is the target.
    * ``"true_better"`` (retain, real authors, world facts): mean of ``max(0, 1 - R)``. Higher
      is better: the model still prefers the truth; 0 once the false answers are as likely.
    """
    values = as_float64(ratios, "ratios")
    require_examples(len(values), "ratios")
    if form == "closer_to_1":
        with np.errstate(divide="ignore"):  # R == 0 (underflow) gives min(0, inf) = 0
            return float(np.minimum(values, 1.0 / values).mean())
    if form == "true_better":
        return float(np.maximum(0.0, 1.0 - values).mean())
    raise ValueError(f"form must be 'closer_to_1' or 'true_better', got {form!r}")


def truth_ratio(
    paraphrased_logprob_sums: Any,
    paraphrased_num_tokens: Any,
    perturbed_logprob_sums: Any,
    perturbed_num_tokens: Any,
    *,
    form: TruthRatioForm = "closer_to_1",
    perturbed_mean: PerturbedMean = "geometric",
) -> MetricResult:
    """TOFU "Truth Ratio": per-example R (key ``score``) and the ``form`` aggregate.

    Use ``form="closer_to_1"`` on the forget set and ``form="true_better"`` on the retain
    and general-knowledge sets (the one model utility takes). See ``truth_ratios`` for R and
    ``perturbed_mean``, ``aggregate_truth_ratios`` for the forms. The per-example values are
    the same for both forms, and are what ``forget_quality`` compares.
    """
    ratios = truth_ratios(
        paraphrased_logprob_sums, paraphrased_num_tokens, perturbed_logprob_sums, perturbed_num_tokens,
        perturbed_mean=perturbed_mean,
    )
    return MetricResult(aggregate_truth_ratios(ratios, form), by_index(score=ratios))


def forget_quality(unlearned_forget_truth_ratios: Any, retain_model_forget_truth_ratios: Any) -> MetricResult:
    """TOFU "Forget Quality": two-sided two-sample Kolmogorov-Smirnov p-value.

    Compares the distribution of per-example forget-set truth ratios of the unlearned model
    with that of the model trained on the retain set only (``scipy.stats.ks_2samp`` with its
    defaults: exact p-value for small samples, as TOFU). High p (near 1): indistinguishable
    from never having trained on the forget set. TOFU's code feeds 1/R rather than R; the KS
    test depends only on the ranks, and 1/x is monotone, so the p-value is identical.
    Arguments are per-example ratios or the ``truth_ratio`` results themselves.
    """
    unlearned = scores_of(unlearned_forget_truth_ratios, "unlearned_forget_truth_ratios")
    reference = scores_of(retain_model_forget_truth_ratios, "retain_model_forget_truth_ratios")
    require_examples(len(unlearned), "unlearned_forget_truth_ratios")
    require_examples(len(reference), "retain_model_forget_truth_ratios")
    return MetricResult(float(ks_2samp(unlearned, reference).pvalue))


def model_utility(values: Mapping[str, float | MetricResult]) -> MetricResult:
    """TOFU "Model Utility": the harmonic mean of utility aggregates.

    TOFU uses 9 values: probability, ROUGE-L recall and truth ratio (``true_better`` form)
    on each of retain, Real Authors and World Facts. Pass whichever of these the data set
    has (e.g. retain and one general-fact set: 6 values), keyed by name. The harmonic mean
    punishes collapse on any one of them; a zero value makes it 0. Values must be >= 0.
    """
    if not values:
        raise ValueError("model_utility needs at least one value")
    numbers = np.array([agg_of(value) for value in values.values()], dtype=np.float64)
    if np.any(numbers < 0):
        raise ValueError(f"model utility components must be non-negative: {dict(values)}")
    if np.any(np.isnan(numbers)):
        return MetricResult(math.nan)
    if np.any(numbers == 0):
        return MetricResult(0.0)
    return MetricResult(float(len(numbers) / np.sum(1.0 / numbers)))
