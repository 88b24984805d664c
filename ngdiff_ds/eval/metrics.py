"""TOFU and MUSE unlearning metrics, as pure functions of numbers computed elsewhere.

Nothing here touches a model: the model side supplies, per example, the sum of the answer
tokens' log-probabilities and the number of answer tokens, per-token log-probabilities of a
text, or generated strings. Every function works in float64 on plain sequences, NumPy
arrays or (CPU or GPU, with or without grad) torch tensors.

Benchmarks
----------
TOFU (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"): answer
probability, normalised (multiple-choice) probability, ROUGE-L recall, truth ratio, forget
quality and model utility.

MUSE (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"):
verbatim memorisation (VerbMem), knowledge memorisation (KnowMem), Min-K% Prob membership
scores (Shi et al., 2024, "Detecting Pretraining Data from Large Language Models"), their
ROC AUC, and PrivLeak.

Where the paper and the public code disagree, the default follows the code that produced
the published numbers, and the alternative is a parameter (see ``truth_ratios`` and
``min_k_percent_score``).

Results format
--------------
Every metric returns a ``MetricResult``: ``agg_value`` (the number a results table shows)
and ``value_by_index`` (per-example values keyed by the example's position as a string,
e.g. ``{"0": {"prob": 0.3}, "1": {"prob": 0.5}}``), the layout of the community's
results files (open-unlearning's TOFU_EVAL.json / MUSE_EVAL.json). Inner keys follow that
layout: ``prob`` (and ``avg_loss``), ``rougeL_recall`` / ``rougeL_f1``, ``score`` (truth
ratio, Min-K%). Set-level metrics (forget quality, model utility, AUC, PrivLeak) have an
empty ``value_by_index``. ``to_results`` builds the JSON-ready dict and ``summary`` the
name -> ``agg_value`` table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from scipy.special import logsumexp
from scipy.stats import ks_2samp, rankdata

TruthRatioForm = Literal["closer_to_1", "true_better"]
PerturbedMean = Literal["geometric", "arithmetic"]
RougeVariant = Literal["recall", "f1"]
MinKRounding = Literal["floor", "ceil"]
AucOrientation = Literal["members_higher", "muse"]

# rouge-score's Score field for each variant.
_ROUGE_SCORE_FIELD = {"recall": "recall", "f1": "fmeasure"}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class MetricResult:
    """One metric: the aggregate and the per-example values.

    ``value_by_index`` maps the example's position (as a string, as in JSON) to a dict
    naming the per-example quantity, e.g. ``{"0": {"prob": 0.31}}``. Empty for metrics
    defined on whole sets only.
    """

    agg_value: float
    value_by_index: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"agg_value": ..., "value_by_index": ...}``; NaN and inf become None."""
        return {
            "agg_value": _json_number(self.agg_value),
            "value_by_index": {
                index: {name: _json_number(value) for name, value in values.items()}
                for index, values in self.value_by_index.items()
            },
        }


def to_results(metrics: Mapping[str, MetricResult | Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{metric_name: {"agg_value": ..., "value_by_index": ...}}``, ready for ``json.dumps``.

    Non-finite numbers (NaN, +-inf) are written as ``None`` (JSON ``null``) because strict
    JSON has no NaN; ``summary`` reads them back as NaN. Entries may be ``MetricResult`` or
    dicts already in this format.
    """
    return {name: _as_result(result).to_dict() for name, result in metrics.items()}


def summary(results: Mapping[str, MetricResult | Mapping[str, Any]]) -> dict[str, float]:
    """Metric name -> ``agg_value``, from ``MetricResult`` objects or ``to_results`` output.

    A ``None`` aggregate (a NaN written to JSON) comes back as NaN.
    """
    table = {}
    for name, result in results.items():
        value = _as_result(result).agg_value
        table[name] = math.nan if value is None else float(value)
    return table


def _as_result(result: MetricResult | Mapping[str, Any]) -> MetricResult:
    if isinstance(result, MetricResult):
        return result
    by_index = dict(result.get("value_by_index") or {})
    return MetricResult(agg_value=result["agg_value"], value_by_index=by_index)


def _json_number(value: Any) -> Any:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _by_index(**per_example: np.ndarray) -> dict[str, dict[str, float]]:
    """``{"0": {name: value, ...}, ...}`` from equal-length arrays of per-example values."""
    lengths = {len(values) for values in per_example.values()}
    assert len(lengths) == 1, "per-example arrays must have equal lengths"
    (length,) = lengths
    return {
        str(index): {name: float(values[index]) for name, values in per_example.items()}
        for index in range(length)
    }


# --------------------------------------------------------------------------- input helpers


def _as_float64(values: Any, name: str) -> np.ndarray:
    """1-D float64 array from a sequence, NumPy array or torch tensor (any device, any grad)."""
    if hasattr(values, "detach"):  # torch tensor; avoids importing torch in this module
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _as_ragged(rows: Any, name: str) -> list[np.ndarray]:
    """A list of 1-D float64 arrays (one per example; lengths may differ)."""
    if hasattr(rows, "detach") or isinstance(rows, np.ndarray):
        if np.ndim(rows) != 2:
            raise ValueError(f"{name} must be a list of lists or a 2-D array, got shape {tuple(rows.shape)}")
    return [_as_float64(row, f"{name}[{i}]") for i, row in enumerate(rows)]


def _require_examples(count: int, name: str) -> None:
    if count == 0:
        raise ValueError(f"{name} has no examples")


def _require_same_length(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} differ in length: {len(a)} != {len(b)}")


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
    sums = _as_ragged(logprob_sums, f"{name} log-prob sums")
    counts = _as_ragged(num_tokens, f"{name} token counts")
    _require_same_length(f"{name} log-prob sums", sums, f"{name} token counts", counts)
    return [_per_token_logprobs(s, c, f"{name}[{i}]") for i, (s, c) in enumerate(zip(sums, counts))]


def _scores_of(values: Any, name: str) -> np.ndarray:
    """Per-example ``score`` values of a ``MetricResult``, or the values themselves."""
    if isinstance(values, MetricResult):
        return np.array([entry["score"] for entry in values.value_by_index.values()], dtype=np.float64)
    return _as_float64(values, name)


def _agg_of(value: float | MetricResult) -> float:
    return float(value.agg_value if isinstance(value, MetricResult) else value)


# --------------------------------------------------------------------------- TOFU


def answer_probability(logprob_sums: Any, num_tokens: Any) -> MetricResult:
    """TOFU "Probability": the length-normalised probability of the ground-truth answer.

    Per example ``P(a|q)^(1/|a|) = exp(logprob_sum / num_tokens)``, i.e. exp(-mean token
    NLL); the aggregate is the mean over examples. Per-example keys: ``prob`` and
    ``avg_loss`` (the mean token NLL, which open-unlearning also stores).
    """
    sums = _as_float64(logprob_sums, "logprob_sums")
    counts = _as_float64(num_tokens, "num_tokens")
    _require_examples(len(sums), "logprob_sums")
    per_token = _per_token_logprobs(sums, counts, "answer_probability")
    probs = np.exp(per_token)
    return MetricResult(float(probs.mean()), _by_index(prob=probs, avg_loss=-per_token))


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
    correct_sums = _as_float64(correct_logprob_sums, "correct_logprob_sums")
    correct_counts = _as_float64(correct_num_tokens, "correct_num_tokens")
    _require_examples(len(correct_sums), "correct_logprob_sums")
    # The per-token values are computed either way: that also checks the token counts.
    correct_log_p = _per_token_logprobs(correct_sums, correct_counts, "correct answers")
    option_log_p = _ragged_per_token_logprobs(option_logprob_sums, option_num_tokens, "options")
    if not length_normalise:
        correct_log_p = correct_sums
        option_log_p = _as_ragged(option_logprob_sums, "option_logprob_sums")
    _require_same_length("correct answers", correct_log_p, "options", option_log_p)

    probs = np.array([
        math.exp(log_c - logsumexp(np.concatenate([[log_c], log_options])))
        for log_c, log_options in zip(correct_log_p, option_log_p)
    ])
    return MetricResult(float(probs.mean()), _by_index(prob=probs))


def rouge_l_recall(
    predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = True
) -> MetricResult:
    """TOFU "ROUGE": ROUGE-L recall of greedy generations against the ground-truth answers.

    ``rouge_score``'s ``RougeScorer(["rougeL"], use_stemmer=True)``, ``score(target=reference,
    prediction=prediction).recall`` (as TOFU's code); recall because a correct answer buried in
    a longer generation should still count. Aggregate: mean. Per-example key: ``rougeL_recall``.
    """
    return _rouge_l(predictions, references, "recall", use_stemmer)


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
    para_sums = _as_float64(paraphrased_logprob_sums, "paraphrased_logprob_sums")
    para_counts = _as_float64(paraphrased_num_tokens, "paraphrased_num_tokens")
    _require_examples(len(para_sums), "paraphrased_logprob_sums")
    para_log_p = _per_token_logprobs(para_sums, para_counts, "paraphrased answers")
    pert_log_p = _ragged_per_token_logprobs(perturbed_logprob_sums, perturbed_num_tokens, "perturbed answers")
    _require_same_length("paraphrased answers", para_log_p, "perturbed answers", pert_log_p)
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
    values = _as_float64(ratios, "ratios")
    _require_examples(len(values), "ratios")
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
    return MetricResult(aggregate_truth_ratios(ratios, form), _by_index(score=ratios))


def forget_quality(unlearned_forget_truth_ratios: Any, retain_model_forget_truth_ratios: Any) -> MetricResult:
    """TOFU "Forget Quality": two-sided two-sample Kolmogorov-Smirnov p-value.

    Compares the distribution of per-example forget-set truth ratios of the unlearned model
    with that of the model trained on the retain set only (``scipy.stats.ks_2samp`` with its
    defaults: exact p-value for small samples, as TOFU). High p (near 1): indistinguishable
    from never having trained on the forget set. TOFU's code feeds 1/R rather than R; the KS
    test depends only on the ranks, and 1/x is monotone, so the p-value is identical.
    Arguments are per-example ratios or the ``truth_ratio`` results themselves.
    """
    unlearned = _scores_of(unlearned_forget_truth_ratios, "unlearned_forget_truth_ratios")
    reference = _scores_of(retain_model_forget_truth_ratios, "retain_model_forget_truth_ratios")
    _require_examples(len(unlearned), "unlearned_forget_truth_ratios")
    _require_examples(len(reference), "retain_model_forget_truth_ratios")
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
    numbers = np.array([_agg_of(value) for value in values.values()], dtype=np.float64)
    if np.any(numbers < 0):
        raise ValueError(f"model utility components must be non-negative: {dict(values)}")
    if np.any(np.isnan(numbers)):
        return MetricResult(math.nan)
    if np.any(numbers == 0):
        return MetricResult(0.0)
    return MetricResult(float(len(numbers) / np.sum(1.0 / numbers)))


# --------------------------------------------------------------------------- MUSE


def verbatim_memorisation(
    predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False
) -> MetricResult:
    """MUSE "VerbMem": ROUGE-L F1 of greedy continuations of forget-text prefixes.

    Per example ``score(target=true_continuation, prediction=generated).fmeasure``; aggregate:
    mean (MUSE's tables show it x100). ``use_stemmer=False`` as in MUSE's released code
    (open-unlearning uses True). Per-example key: ``rougeL_f1``.
    """
    return _rouge_l(predictions, references, "f1", use_stemmer)


def knowledge_memorisation(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    rouge_variant: RougeVariant = "f1",
    use_stemmer: bool = False,
) -> MetricResult:
    """MUSE "KnowMem": ROUGE-L between generated and true answers to QA pairs.

    Default ``rouge_variant="f1"``: MUSE's released ``eval.py`` aggregates KnowMem with
    ``knowmem_agg_key='mean_rougeL'``, which its logger fills with ``.fmeasure`` (it logs
    recall only as ``rougeL_recall``, unused for the reported number), and open-unlearning's
    ``forget_knowmem_ROUGE`` uses ``rouge_type: rougeL_f1``. ``"recall"`` gives the TOFU-style
    variant. Aggregate: mean (x100 in MUSE's tables). Per-example key: ``rougeL_<variant>``.
    """
    return _rouge_l(predictions, references, rouge_variant, use_stemmer)


def min_k_percent_score(token_logprobs: Any, k: float = 0.4, *, rounding: MinKRounding = "floor") -> float:
    """Min-K% Prob membership score of one text: mean of its lowest K% token log-probs.

    Higher means more likely a training member (a seen text has few very unlikely tokens).
    MUSE uses k=0.4 and stores the negative of this value; here the sign is "higher = member"
    throughout, and ``auc`` / ``privleak`` handle the orientation.

    The number of tokens kept is ``max(1, floor(k*n))`` by default, as the Min-K% and MUSE
    code (``int(len * ratio)``) with open-unlearning's guard against keeping none;
    ``rounding="ceil"`` keeps ``ceil(k*n)``. ``k*n`` is rounded to 9 decimals first so that
    float error (0.3 * 10 = 3.0000000000000004) does not change the count.
    """
    values = _as_float64(token_logprobs, "token_logprobs")
    if len(values) == 0:
        raise ValueError("token_logprobs is empty")
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    exact_count = round(k * len(values), 9)
    if rounding == "floor":
        count = max(1, math.floor(exact_count))
    elif rounding == "ceil":
        count = math.ceil(exact_count)
    else:
        raise ValueError(f"rounding must be 'floor' or 'ceil', got {rounding!r}")
    return float(np.sort(values)[:count].mean())


def min_k_percent_scores(
    texts_token_logprobs: Sequence[Any], k: float = 0.4, *, rounding: MinKRounding = "floor"
) -> MetricResult:
    """``min_k_percent_score`` for each text (key ``score``); aggregate: mean score."""
    _require_examples(len(texts_token_logprobs), "texts_token_logprobs")
    scores = np.array([min_k_percent_score(row, k, rounding=rounding) for row in texts_token_logprobs])
    return MetricResult(float(scores.mean()), _by_index(score=scores))


def auc(member_scores: Any, nonmember_scores: Any) -> MetricResult:
    """ROC AUC of a membership score: P(member score > non-member score), ties counting 1/2.

    Computed as the Mann-Whitney U statistic of the members over ``n_members * n_nonmembers``
    (average ranks give each tied pair 1/2), which equals the area under the ROC curve.
    1.0: every member scores above every non-member; 0.5: no separation. Arguments are
    per-example scores (higher = member, e.g. ``min_k_percent_score``) or the
    ``min_k_percent_scores`` results.
    """
    members = _scores_of(member_scores, "member_scores")
    nonmembers = _scores_of(nonmember_scores, "nonmember_scores")
    _require_examples(len(members), "member_scores")
    _require_examples(len(nonmembers), "nonmember_scores")
    if np.any(np.isnan(members)) or np.any(np.isnan(nonmembers)):
        raise ValueError("membership scores contain NaN")
    ranks = rankdata(np.concatenate([members, nonmembers]))  # average ranks for ties
    n_members, n_nonmembers = len(members), len(nonmembers)
    u_members = ranks[:n_members].sum() - n_members * (n_members + 1) / 2
    return MetricResult(float(u_members / (n_members * n_nonmembers)))


def privleak(
    auc_unlearned: float | MetricResult,
    auc_retain: float | MetricResult,
    *,
    auc_orientation: AucOrientation = "members_higher",
) -> MetricResult:
    """MUSE "PrivLeak", in percent, with MUSE's sign convention.

    MUSE defines ``PrivLeak = (AUC_unlearned - AUC_retrain) / AUC_retrain * 100``, both AUCs
    of a Min-K% (k=0.4) attack separating the forget set from a held-out set. Its code
    computes that AUC with the *forget* texts as the negative class, i.e. it stores
    ``1 - AUC_members_higher``. With that orientation:

    * 0: the unlearned model leaks as much as a model retrained without the forget set (ideal);
    * negative (down to -100): under-unlearned, forget texts still look like training members
      (MUSE reports about -100 for the model before unlearning);
    * positive: over-unlearned, forget texts look *less* familiar than unseen text, itself a
      detectable trace.

    ``auc_orientation="members_higher"`` (default) takes AUCs from ``auc`` (forget = members,
    P(member score higher)) and converts them: the result is
    ``(AUC_retain - AUC_unlearned) / (1 - AUC_retain) * 100``. ``"muse"`` takes AUCs already in
    MUSE's orientation and applies the formula as written. NaN if the reference AUC (in
    MUSE's orientation) is 0, where the ratio is undefined.
    """
    unlearned, retain = _agg_of(auc_unlearned), _agg_of(auc_retain)
    if auc_orientation == "members_higher":
        unlearned, retain = 1.0 - unlearned, 1.0 - retain
    elif auc_orientation != "muse":
        raise ValueError(f"auc_orientation must be 'members_higher' or 'muse', got {auc_orientation!r}")
    if retain == 0.0:
        return MetricResult(math.nan)
    return MetricResult(float((unlearned - retain) / retain * 100.0))


# --------------------------------------------------------------------------- ROUGE


@lru_cache(maxsize=None)
def _rouge_l_scorer(use_stemmer: bool):
    # Imported lazily: rouge_score pulls in nltk (about a second), needed only for ROUGE.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def _rouge_l(
    predictions: Sequence[str], references: Sequence[str], variant: str, use_stemmer: bool
) -> MetricResult:
    if variant not in _ROUGE_SCORE_FIELD:
        raise ValueError(f"rouge variant must be one of {sorted(_ROUGE_SCORE_FIELD)}, got {variant!r}")
    _require_same_length("predictions", predictions, "references", references)
    _require_examples(len(predictions), "predictions")
    scorer = _rouge_l_scorer(use_stemmer)
    score_field = _ROUGE_SCORE_FIELD[variant]
    values = np.array([
        getattr(scorer.score(target=reference, prediction=prediction)["rougeL"], score_field)
        for prediction, reference in zip(predictions, references)
    ])
    return MetricResult(float(values.mean()), _by_index(**{f"rougeL_{variant}": values}))
