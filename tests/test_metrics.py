"""Unit tests for ngdiff_ds.eval.metrics against hand-worked numbers and float64 references."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp

from ngdiff_ds.eval.metrics import (
    aggregate_truth_ratios,
    answer_probability,
    forget_quality,
    model_utility,
    normalised_probability,
    rouge_l_recall,
    truth_ratio,
    truth_ratios,
)
from ngdiff_ds.eval.results import MetricResult, summary, to_results
from ngdiff_ds.eval.text_metrics import (
    auc,
    knowledge_memorisation,
    min_k_percent_score,
    min_k_percent_scores,
    privleak,
    verbatim_memorisation,
)

E = math.e


def values_of(result: MetricResult, key: str) -> list[float]:
    return [result.value_by_index[str(i)][key] for i in range(len(result.value_by_index))]


# --------------------------------------------------------------------------- probability


def test_answer_probability_is_length_normalised():
    # exp(-2/2) = e^-1, exp(-3/1) = e^-3, exp(0/4) = 1
    result = answer_probability([-2.0, -3.0, 0.0], [2, 1, 4])
    assert values_of(result, "prob") == pytest.approx([0.36787944117, 0.04978706837, 1.0], rel=1e-10)
    assert values_of(result, "avg_loss") == pytest.approx([1.0, 3.0, 0.0])
    assert result.agg_value == pytest.approx((0.36787944117 + 0.04978706837 + 1.0) / 3, rel=1e-10)
    assert set(result.value_by_index) == {"0", "1", "2"}


def test_answer_probability_takes_tensors_with_grad():
    sums = torch.tensor([-2.0, -3.0], requires_grad=True)
    result = answer_probability(sums, torch.tensor([2, 1]))
    assert result.agg_value == pytest.approx((math.exp(-1) + math.exp(-3)) / 2, rel=1e-6)


def test_answer_probability_rejects_empty_answer():
    with pytest.raises(ValueError, match="at least one token"):
        answer_probability([-1.0], [0])


def test_normalised_probability_by_hand():
    # Example 0: correct -2 over 2 tokens -> e^-1; wrong: -3/3 -> e^-1, -4/2 -> e^-2.
    #   e^-1 / (e^-1 + e^-1 + e^-2) = 0.367879 / 0.871094 = 0.422319
    # Example 1 (one wrong option only): correct -1/1 -> e^-1; wrong -6/2 -> e^-3.
    #   e^-1 / (e^-1 + e^-3) = 1 / (1 + e^-2) = 0.880797
    result = normalised_probability([-2.0, -1.0], [2, 1], [[-3.0, -4.0], [-6.0]], [[3, 2], [2]])
    assert values_of(result, "prob") == pytest.approx([0.4223187982, 0.8807970780], rel=1e-9)
    assert result.agg_value == pytest.approx((0.4223187982 + 0.8807970780) / 2, rel=1e-9)

    # Raw probabilities: e^-2 / (e^-2 + e^-3 + e^-4) = 0.665241 and e^-1 / (e^-1 + e^-6) = 0.993307
    raw = normalised_probability([-2.0, -1.0], [2, 1], [[-3.0, -4.0], [-6.0]], [[3, 2], [2]],
                                 length_normalise=False)
    assert values_of(raw, "prob") == pytest.approx([0.6652409558, 0.9933071491], rel=1e-9)


def test_normalised_probability_does_not_underflow():
    # Raw probabilities e^-2000 and e^-2001 are 0.0 in float64; the ratio is 1 / (1 + e^-1).
    result = normalised_probability([-2000.0], [1000], [[-2001.0]], [[1000]], length_normalise=False)
    assert result.agg_value == pytest.approx(1.0 / (1.0 + math.exp(-1.0)), rel=1e-12)


# --------------------------------------------------------------------------- ROUGE

PAIRS = [  # (prediction, reference)
    ("the cat lay on a mat", "the cat sat on the mat"),
    ("The cats were running quickly.", "A cat runs quickly"),
    ("He was born in Paris, France in 1952.", "The author was born in Paris."),
    ("", "non-empty reference"),
    ("completely different words", "nothing shared here"),
]


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = "the cat on mat": 4 of 6 tokens
    # each side -> recall = precision = F1 = 4/6.
    prediction, reference = ["the cat lay on a mat"], ["the cat sat on the mat"]
    assert rouge_l_recall(prediction, reference).agg_value == pytest.approx(4 / 6)
    assert verbatim_memorisation(prediction, reference).agg_value == pytest.approx(4 / 6)
    # LCS("the cat sat on the mat", "the cat sat") = 3: recall 3/6, precision 3/3, F1 = 2/3.
    assert rouge_l_recall(["the cat sat"], ["the cat sat on the mat"]).agg_value == pytest.approx(0.5)
    prediction, reference = ["the cat sat"], ["the cat sat on the mat"]
    assert knowledge_memorisation(prediction, reference).agg_value == pytest.approx(2 / 3)
    recall = knowledge_memorisation(prediction, reference, rouge_variant="recall")
    assert recall.agg_value == pytest.approx(0.5)


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_l_matches_rouge_score(use_stemmer):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    scores = [scorer.score(target=ref, prediction=pred)["rougeL"] for pred, ref in PAIRS]
    predictions, references = [p for p, _ in PAIRS], [r for _, r in PAIRS]

    recall = rouge_l_recall(predictions, references, use_stemmer=use_stemmer)
    assert values_of(recall, "rougeL_recall") == [s.recall for s in scores]
    assert recall.agg_value == pytest.approx(np.mean([s.recall for s in scores]))

    verbatim = verbatim_memorisation(predictions, references, use_stemmer=use_stemmer)
    assert values_of(verbatim, "rougeL_f1") == [s.fmeasure for s in scores]

    knowledge = knowledge_memorisation(predictions, references, use_stemmer=use_stemmer)
    assert values_of(knowledge, "rougeL_f1") == [s.fmeasure for s in scores]
    knowledge_recall = knowledge_memorisation(predictions, references, rouge_variant="recall",
                                              use_stemmer=use_stemmer)
    assert values_of(knowledge_recall, "rougeL_recall") == [s.recall for s in scores]


def test_rouge_l_defaults_stemming_per_benchmark():
    # "cats running" vs "cat runs": Porter-stemmed both are "cat run" -> recall 1; unstemmed
    # no token matches -> 0.
    assert rouge_l_recall(["cats running"], ["cat runs"]).agg_value == pytest.approx(1.0)  # TOFU: stemmer
    assert verbatim_memorisation(["cats running"], ["cat runs"]).agg_value == 0.0  # MUSE: no stemmer


def test_rouge_l_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        rouge_l_recall(["a", "b"], ["a"])


# --------------------------------------------------------------------------- truth ratio

# Worked example, three questions (per-token log-prob = sum / tokens):
#   q0: paraphrased -4/4 = -1; perturbed -6/3 = -2 and -2/2 = -1
#       geometric:  exp(mean(-2, -1) - (-1)) = exp(-0.5)                    = 0.6065306597
#       arithmetic: ((e^-2 + e^-1) / 2) / e^-1 = (1 + e^-1) / 2              = 0.6839397206
#   q1: paraphrased -2/2 = -1; perturbed -1/1 = -1 and -3/3 = -1  -> R = 1 both ways
#   q2: paraphrased -6/2 = -3; one perturbed -2/2 = -1            -> R = e^2 = 7.3890560989
PARA_SUMS, PARA_TOKENS = [-4.0, -2.0, -6.0], [4, 2, 2]
PERT_SUMS, PERT_TOKENS = [[-6.0, -2.0], [-1.0, -3.0], [-2.0]], [[3, 2], [1, 3], [2]]
R_GEOMETRIC = [0.6065306597, 1.0, 7.3890560989]
R_ARITHMETIC = [0.6839397206, 1.0, 7.3890560989]


def test_truth_ratios_worked_example():
    geometric = truth_ratios(PARA_SUMS, PARA_TOKENS, PERT_SUMS, PERT_TOKENS)
    assert geometric == pytest.approx(R_GEOMETRIC, rel=1e-9)
    assert truth_ratios(PARA_SUMS, PARA_TOKENS, PERT_SUMS, PERT_TOKENS,
                        perturbed_mean="arithmetic") == pytest.approx(R_ARITHMETIC, rel=1e-9)


def test_truth_ratio_forms_worked_example():
    # closer_to_1: mean(min(R, 1/R)) = (0.6065306597 + 1 + e^-2 = 0.1353352832) / 3 = 0.5806219810
    forget = truth_ratio(PARA_SUMS, PARA_TOKENS, PERT_SUMS, PERT_TOKENS, form="closer_to_1")
    assert forget.agg_value == pytest.approx(0.5806219810, rel=1e-9)
    assert values_of(forget, "score") == pytest.approx(R_GEOMETRIC, rel=1e-9)
    # true_better: mean(max(0, 1 - R)) = (0.3934693403 + 0 + 0) / 3 = 0.1311564468
    retain = truth_ratio(PARA_SUMS, PARA_TOKENS, PERT_SUMS, PERT_TOKENS, form="true_better")
    assert retain.agg_value == pytest.approx(0.1311564468, rel=1e-9)
    # arithmetic, closer_to_1: (0.6839397206 + 1 + 0.1353352832) / 3 = 0.6064250013
    arithmetic = truth_ratio(PARA_SUMS, PARA_TOKENS, PERT_SUMS, PERT_TOKENS, perturbed_mean="arithmetic")
    assert arithmetic.agg_value == pytest.approx(0.6064250013, rel=1e-9)


def test_truth_ratio_is_stable_for_tiny_probabilities():
    # Per-token log-probs of -900 underflow exp() in float64; the ratio is still e^-1.
    ratios = truth_ratios([-900.0], [1], [[-901.0, -901.0]], [[1, 1]], perturbed_mean="arithmetic")
    assert ratios == pytest.approx([math.exp(-1)], rel=1e-12)


def test_truth_ratio_takes_tensors():
    ratios = truth_ratios(
        torch.tensor(PARA_SUMS), torch.tensor(PARA_TOKENS),
        [torch.tensor(row) for row in PERT_SUMS], [torch.tensor(row) for row in PERT_TOKENS],
    )
    assert ratios == pytest.approx(R_GEOMETRIC, rel=1e-6)


def test_aggregate_truth_ratio_rejects_unknown_form():
    with pytest.raises(ValueError, match="form"):
        aggregate_truth_ratios([1.0], "closest")


# --------------------------------------------------------------------------- forget quality

UNLEARNED_TR = [0.21, 0.35, 0.52, 0.48, 0.91, 0.13, 0.66, 0.29, 0.44, 0.70, 0.38, 0.57]
RETAIN_TR = [0.55, 0.62, 0.81, 0.47, 0.99, 0.73, 0.68, 0.88, 0.59, 0.77]


def test_forget_quality_matches_scipy():
    assert forget_quality(UNLEARNED_TR, RETAIN_TR).agg_value == ks_2samp(UNLEARNED_TR, RETAIN_TR).pvalue


def test_forget_quality_known_p_values():
    assert forget_quality(RETAIN_TR, RETAIN_TR).agg_value == pytest.approx(1.0)
    # n = m = 3, fully separated: D = 1, reached by 2 of the C(6, 3) = 20 equally likely
    # orderings under H0 (all x below all y, or all above) -> exact two-sided p = 2/20 = 0.1.
    assert forget_quality([0.1, 0.2, 0.3], [0.6, 0.7, 0.8]).agg_value == pytest.approx(2 / math.comb(6, 3))


def test_forget_quality_is_invariant_to_inverting_ratios():
    # TOFU's code feeds 1/R; the KS test only sees ranks, so the p-value is the same.
    inverted = forget_quality(1 / np.array(UNLEARNED_TR), 1 / np.array(RETAIN_TR)).agg_value
    assert inverted == pytest.approx(forget_quality(UNLEARNED_TR, RETAIN_TR).agg_value, rel=1e-12)


def test_forget_quality_takes_truth_ratio_results():
    result = truth_ratio(PARA_SUMS, PARA_TOKENS, PERT_SUMS, PERT_TOKENS)
    assert forget_quality(result, result).agg_value == pytest.approx(1.0)


# --------------------------------------------------------------------------- model utility


def test_model_utility_harmonic_mean():
    values = {"retain_prob": 0.5, "retain_rouge": 0.25, "retain_truth_ratio": 1.0}
    assert model_utility(values).agg_value == pytest.approx(3 / (2 + 4 + 1))
    assert model_utility(values).agg_value == pytest.approx(hmean(list(values.values())))


def test_model_utility_zero_and_results():
    assert model_utility({"a": 0.7, "b": 0.0, "c": 0.9}).agg_value == 0.0
    assert model_utility({"a": MetricResult(0.5), "b": 0.5}).agg_value == pytest.approx(0.5)
    with pytest.raises(ValueError, match="non-negative"):
        model_utility({"a": -0.1})


# --------------------------------------------------------------------------- Min-K%


def test_min_k_percent_score_known_answers():
    logprobs = [-1.0, -5.0, -2.0, -8.0, -3.0]
    # k = 0.4 of 5 tokens = 2 lowest: -8 and -5 -> -6.5
    assert min_k_percent_score(logprobs) == pytest.approx(-6.5)
    assert min_k_percent_score(torch.tensor(logprobs)) == pytest.approx(-6.5)
    # 0.4 of 4 tokens = 1.6: floor keeps 1 (-8), ceil keeps 2 (-8, -5)
    assert min_k_percent_score(logprobs[:4]) == pytest.approx(-8.0)
    assert min_k_percent_score(logprobs[:4], rounding="ceil") == pytest.approx(-6.5)
    # float error: 0.3 * 10 = 3.0000000000000004 must still keep exactly 3 tokens
    ten = [-float(i) for i in range(10)]  # lowest three: -9, -8, -7
    assert min_k_percent_score(ten, 0.3, rounding="ceil") == pytest.approx(-8.0)
    assert min_k_percent_score(ten, 0.3) == pytest.approx(-8.0)
    # at least one token is kept; k = 1 is the mean log-prob
    assert min_k_percent_score([-4.0, -2.0], 0.4) == pytest.approx(-4.0)
    assert min_k_percent_score(logprobs, 1.0) == pytest.approx(-19.0 / 5)


def test_min_k_percent_scores_per_text():
    result = min_k_percent_scores([[-1.0, -5.0, -2.0, -8.0, -3.0], [-0.5, -0.1]], k=0.5)
    # 2 of 5 (floor 2.5) -> -6.5; 1 of 2 -> -0.5
    assert values_of(result, "score") == pytest.approx([-6.5, -0.5])
    assert result.agg_value == pytest.approx(-3.5)


# --------------------------------------------------------------------------- AUC and PrivLeak


def brute_force_auc(members, nonmembers) -> float:
    pairs = list(itertools.product(members, nonmembers))
    wins = sum(1.0 if m > n else 0.5 if m == n else 0.0 for m, n in pairs)
    return wins / len(pairs)


def test_auc_matches_pair_count_with_ties():
    members = [-1.0, -2.5, -2.5, -0.5, -3.0, -1.0, -4.0]
    nonmembers = [-2.5, -3.5, -1.0, -5.0, -2.5]
    expected = brute_force_auc(members, nonmembers)
    assert auc(members, nonmembers).agg_value == pytest.approx(expected, abs=1e-12)
    rng = np.random.default_rng(0)
    members, nonmembers = rng.integers(0, 6, 40).tolist(), rng.integers(0, 6, 30).tolist()  # many ties
    expected = brute_force_auc(members, nonmembers)
    assert auc(members, nonmembers).agg_value == pytest.approx(expected, abs=1e-12)


def test_auc_extremes():
    assert auc([3.0, 4.0], [1.0, 2.0]).agg_value == 1.0
    assert auc([1.0, 2.0], [3.0, 4.0]).agg_value == 0.0
    assert auc([2.0, 2.0, 2.0], [2.0, 2.0]).agg_value == 0.5


def test_auc_takes_min_k_results():
    members = min_k_percent_scores([[-0.1, -0.2], [-0.3, -0.1]])
    nonmembers = min_k_percent_scores([[-3.0, -2.0], [-4.0, -1.0]])
    assert auc(members, nonmembers).agg_value == 1.0


def test_privleak_sign_and_scale():
    # Forget set perfectly detectable as members (model before unlearning) vs a retrained
    # reference at chance: MUSE reports -100% (under-unlearned).
    assert privleak(1.0, 0.5).agg_value == pytest.approx(-100.0)
    assert privleak(0.5, 0.5).agg_value == pytest.approx(0.0)
    # Forget texts now look less familiar than unseen ones: positive (over-unlearned).
    # MUSE orientation: (0.7 - 0.5) / 0.5 * 100 = +40
    assert privleak(0.3, 0.5).agg_value == pytest.approx(40.0)
    # Reference not at chance: ((1 - 0.8) - (1 - 0.6)) / (1 - 0.6) * 100 = -50%
    assert privleak(0.8, 0.6).agg_value == pytest.approx(-50.0)
    # Takes auc() results: members all above (AUC 1) vs all tied (AUC 0.5) -> -100%
    assert privleak(auc([3.0, 4.0], [1.0, 2.0]), auc([2.0, 2.0], [2.0])).agg_value == pytest.approx(-100.0)
    # AUCs already in MUSE's orientation: formula as written.
    assert privleak(0.6, 0.5, auc_orientation="muse").agg_value == pytest.approx(20.0)
    assert math.isnan(privleak(0.9, 1.0).agg_value)


# --------------------------------------------------------------------------- results schema


def test_results_schema_round_trips_through_json():
    metrics = {
        "forget_Q_A_Prob": answer_probability([-2.0, -3.0], [2, 1]),
        "forget_Truth_Ratio": truth_ratio(PARA_SUMS, PARA_TOKENS, PERT_SUMS, PERT_TOKENS),
        "forget_quality": forget_quality(UNLEARNED_TR, RETAIN_TR),
        "privleak": privleak(0.9, 1.0),  # NaN
    }
    results = to_results(metrics)
    text = json.dumps(results, allow_nan=False)  # strict JSON: NaN must already be null
    loaded = json.loads(text)

    assert loaded["forget_Q_A_Prob"] == {
        "agg_value": pytest.approx((math.exp(-1) + math.exp(-3)) / 2),
        "value_by_index": {"0": {"prob": pytest.approx(math.exp(-1)), "avg_loss": 1.0},
                           "1": {"prob": pytest.approx(math.exp(-3)), "avg_loss": 3.0}},
    }
    assert loaded["forget_Truth_Ratio"]["value_by_index"]["2"]["score"] == pytest.approx(E ** 2)
    assert loaded["forget_quality"]["value_by_index"] == {}
    assert loaded["privleak"]["agg_value"] is None

    table = summary(loaded)
    assert table["forget_quality"] == metrics["forget_quality"].agg_value
    assert math.isnan(table["privleak"])
    assert summary(metrics)["forget_Truth_Ratio"] == metrics["forget_Truth_Ratio"].agg_value
    assert summary(loaded)["forget_Q_A_Prob"] == metrics["forget_Q_A_Prob"].agg_value
