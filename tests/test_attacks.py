"""Memorisation metrics and membership-attack scores against hand computations.

Every expected value is worked out here from the formula (in comments or with plain float64
NumPy written for the test), never by calling the code under test a second time.
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest

from ngdiff_ds.eval.attacks import (attack_auc, exact_memorization, extraction_strength,
                                    loss_scores, mia_result, min_k_plus_plus_scores,
                                    reference_scores, token_mu_sigma, zlib_compressed_length,
                                    zlib_scores)
from ngdiff_ds.eval.text_metrics import privleak


def per_example(result):
    return [entry["score"] for entry in result.value_by_index.values()]


# --------------------------------------------------------------------------- exact memorisation


def test_exact_memorization_is_fraction_of_matching_tokens():
    result = exact_memorization([[1, 0, 1, 1], [0, 0], [True, True, True]])
    # 3/4 match, 0/2 match, 3/3 match; mean (0.75 + 0 + 1) / 3
    assert per_example(result) == pytest.approx([0.75, 0.0, 1.0])
    assert result.agg_value == pytest.approx(1.75 / 3)
    assert list(result.value_by_index) == ["0", "1", "2"]


def test_exact_memorization_accepts_a_2d_bool_array():
    result = exact_memorization(np.array([[True, False], [False, False]]))
    assert per_example(result) == pytest.approx([0.5, 0.0])


def test_exact_memorization_rejects_empty_and_non_binary_examples():
    with pytest.raises(ValueError, match=r"token_matches\[1\] has no tokens"):
        exact_memorization([[1, 0], []])
    with pytest.raises(ValueError, match="token_matches has no examples"):
        exact_memorization([])
    with pytest.raises(ValueError, match=r"token_matches\[0\] must hold only 0/1"):
        exact_memorization([[0.5, 1.0]])
    with pytest.raises(ValueError, match=r"token_matches\[0\] contains NaN"):
        exact_memorization([[float("nan"), 1.0]])


# --------------------------------------------------------------------------- extraction strength


@pytest.mark.parametrize(
    "matches, expected_ou, expected_definition",
    [
        ([1, 1, 1, 1], 1.0, 1.0),  # k = 0: the whole answer is reproduced
        ([0, 1, 1], 2 / 3, 2 / 3),  # k = 1: 1 - 1/3
        ([0, 0, 0, 1], 0.25, 0.25),  # k = 3: only the last token; 1 - 3/4
        ([1, 0, 1, 1, 0, 1], 1 / 6, 1 / 6),  # last mismatch at 4, so k = 5; 1 - 5/6
        ([1, 1, 0], 1 / 3, 0.0),  # last token wrong: OU leaves k = n-1 = 2; definition k = 3
        ([0, 0, 0, 0], 0.25, 0.0),  # none match: OU k = 3 -> 1/4; definition k = 4 -> 0
        ([0], 1.0, 0.0),  # one wrong token: OU k = 0 -> 1 - 0/1 = 1
        ([1], 1.0, 1.0),
    ],
)
def test_extraction_strength_by_hand(matches, expected_ou, expected_definition):
    assert extraction_strength([matches]).agg_value == pytest.approx(expected_ou)
    assert extraction_strength([matches], convention="definition").agg_value == pytest.approx(
        expected_definition
    )


def _ou_search_loop(matches):
    """OU's procedure as described in memorization.py: try k = 0..n-1, stop at the first
    matching suffix; without one, k stays at the last value tried."""
    n = len(matches)
    for k in range(n):
        if all(matches[k:]):
            break
    return 1 - k / n


def test_extraction_strength_follows_ou_search_on_random_examples():
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(0, 2, size=rng.integers(1, 9))) for _ in range(200)]
    # mostly-matching rows too, so long matched suffixes occur
    rows += [list((rng.random(rng.integers(1, 9)) < 0.85).astype(int)) for _ in range(200)]
    result = extraction_strength(rows)
    assert per_example(result) == pytest.approx([_ou_search_loop(row) for row in rows])
    assert result.agg_value == pytest.approx(np.mean([_ou_search_loop(row) for row in rows]))


def test_extraction_strength_rejects_bad_input():
    with pytest.raises(ValueError, match=r"token_matches\[0\] has no tokens"):
        extraction_strength([[]])
    with pytest.raises(ValueError, match="convention"):
        extraction_strength([[1]], convention="paper")


# --------------------------------------------------------------------------- loss and zlib


def test_loss_score_is_mean_token_logprob():
    result = loss_scores([[-0.5, -1.0, -1.5], [-0.1]])
    # (-0.5 - 1.0 - 1.5) / 3 = -1.0; -0.1; aggregate (-1.0 - 0.1) / 2
    assert per_example(result) == pytest.approx([-1.0, -0.1])
    assert result.agg_value == pytest.approx(-0.55)


def test_loss_score_rejects_nan_and_empty_examples():
    with pytest.raises(ValueError, match=r"token_logprobs\[1\] contains NaN"):
        loss_scores([[-1.0], [-1.0, float("nan")]])
    with pytest.raises(ValueError, match=r"token_logprobs\[0\] has no tokens"):
        loss_scores([[]])


def test_zlib_length_is_that_of_zlib_compress_of_utf8_bytes():
    text = "naïve café, naïve café"  # non-ASCII: UTF-8 and Latin-1 encodings differ
    assert zlib_compressed_length(text) == len(zlib.compress(text.encode("utf-8")))
    assert zlib_compressed_length("") == len(zlib.compress(b""))


def test_zlib_score_divides_mean_logprob_by_compressed_length():
    texts = ["hello hello hello", "The author was born in Santiago, Chile, in 1942."]
    lengths = [len(zlib.compress(text.encode("utf-8"))) for text in texts]
    result = zlib_scores([[-1.0, -3.0], [-0.2, -0.4, -0.6]], texts)
    # mean log p: -2.0 and -0.4, each over its text's compressed length
    assert per_example(result) == pytest.approx([-2.0 / lengths[0], -0.4 / lengths[1]])


def test_zlib_score_uses_the_mean_not_the_sum():
    # same mean (-1), different token counts: equal scores only if the loss is a mean
    result = zlib_scores([[-1.0], [-0.5, -1.5, -1.0, -1.0]], ["same text", "same text"])
    first, second = per_example(result)
    assert first == pytest.approx(second)


def test_zlib_score_checks_texts():
    with pytest.raises(ValueError, match="token_logprobs and texts differ in length"):
        zlib_scores([[-1.0]], ["a", "b"])
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str"):
        zlib_scores([[-1.0]], [b"bytes"])


# --------------------------------------------------------------------------- mu / sigma


def test_mu_sigma_of_a_two_token_distribution_in_closed_form():
    # logits [0, ln 3] -> p = [1/4, 3/4]. mu = 1/4 ln(1/4) + 3/4 ln(3/4).
    # Two-point variance: p1 p2 (ln p1 - ln p2)^2 = 3/16 (ln 1/3)^2 -> sigma = sqrt(3)/4 ln 3.
    mu, sigma = token_mu_sigma([[0.0, math.log(3.0)]])
    assert mu[0] == pytest.approx(0.25 * math.log(0.25) + 0.75 * math.log(0.75), rel=1e-12)
    assert sigma[0] == pytest.approx(math.sqrt(3.0) / 4.0 * math.log(3.0), rel=1e-12)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64


def test_mu_sigma_uniform_large_and_minus_inf_logits():
    # uniform over 4: log p = -ln 4 everywhere, no spread
    mu, sigma = token_mu_sigma([[2.0, 2.0, 2.0, 2.0]])
    assert mu[0] == pytest.approx(-math.log(4.0)) and sigma[0] == pytest.approx(0.0, abs=1e-12)
    # same distribution as [0, ln 3]; a naive exp(1000) would overflow
    mu, sigma = token_mu_sigma([[1000.0, 1000.0 + math.log(3.0)]])
    assert mu[0] == pytest.approx(0.25 * math.log(0.25) + 0.75 * math.log(0.75), rel=1e-12)
    assert sigma[0] == pytest.approx(math.sqrt(3.0) / 4.0 * math.log(3.0), rel=1e-9)
    # a masked token has p = 0 and adds nothing: uniform over the other 2
    mu, sigma = token_mu_sigma([[0.0, 0.0, -math.inf]])
    assert mu[0] == pytest.approx(-math.log(2.0)) and sigma[0] == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(mu).all() and np.isfinite(sigma).all()


def test_mu_sigma_against_explicit_softmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(5, 50))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # fine at this scale
    logp = np.log(probs)
    expected_mu = (probs * logp).sum(axis=1)
    expected_sigma = np.sqrt((probs * logp**2).sum(axis=1) - expected_mu**2)  # OU's form
    mu, sigma = token_mu_sigma(logits)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-9)


def test_mu_sigma_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    logits = [[0.5, -1.0, 2.0], [0.0, 0.0, 1.0]]
    mu_np, sigma_np = token_mu_sigma(np.array(logits))
    mu_t, sigma_t = token_mu_sigma(torch.tensor(logits, dtype=torch.float32))
    np.testing.assert_allclose(mu_t, mu_np, rtol=1e-7)
    np.testing.assert_allclose(sigma_t, sigma_np, rtol=1e-7)


def test_mu_sigma_rejects_bad_logits():
    with pytest.raises(ValueError, match="two-dimensional"):
        token_mu_sigma([0.0, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        token_mu_sigma([[0.0, float("nan")]])
    with pytest.raises(ValueError, match="every logit is -inf"):
        token_mu_sigma([[-math.inf, -math.inf]])


# --------------------------------------------------------------------------- Min-K%++


def test_min_k_plus_plus_by_hand():
    logprobs = [[-1.0, -2.0, -3.0, -4.0, -5.0]]
    mu = [[-1.0, -1.0, -1.0, -1.0, -1.0]]
    sigma = [[1.0, 1.0, 2.0, 0.5, 1.0]]
    # z = (log p - mu) / sigma = [0, -1, -1, -6, -4]
    # k = 0.4, n = 5: keep floor(2.0) = 2 lowest, (-6 - 4) / 2 = -5
    assert min_k_plus_plus_scores(logprobs, mu, sigma).agg_value == pytest.approx(-5.0)
    # k = 0.5: 2.5 tokens -> floor keeps 2 (-5), ceil keeps 3: (-6 - 4 - 1) / 3
    assert min_k_plus_plus_scores(logprobs, mu, sigma, k=0.5).agg_value == pytest.approx(-5.0)
    assert min_k_plus_plus_scores(logprobs, mu, sigma, k=0.5, rounding="ceil").agg_value == pytest.approx(-11 / 3)
    # k = 0.1: 0.5 tokens -> at least one is kept: -6
    assert min_k_plus_plus_scores(logprobs, mu, sigma, k=0.1).agg_value == pytest.approx(-6.0)


def test_min_k_plus_plus_count_ignores_float_error():
    # 0.3 * 10 = 3.0000000000000004 in floating point; ceil must still keep 3 tokens, not 4
    logprobs = [[-float(i) for i in range(1, 11)]]  # z = log p with mu 0, sigma 1
    zeros, ones = [[0.0] * 10], [[1.0] * 10]
    # lowest three of -1..-10: -10, -9, -8 -> mean -9
    assert min_k_plus_plus_scores(logprobs, zeros, ones, k=0.3, rounding="ceil").agg_value == pytest.approx(-9.0)
    assert min_k_plus_plus_scores(logprobs, zeros, ones, k=0.3).agg_value == pytest.approx(-9.0)


@pytest.mark.parametrize("sigma, expected_z", [
    (0.0, -100.0),  # variance 0 -> floor 1e-6 -> divide by 1e-3: -0.1 / 1e-3
    (1e-4, -100.0),  # variance 1e-8 < 1e-6: floored as well
    (0.01, -10.0),  # variance 1e-4 > 1e-6: -0.1 / 0.01
])
def test_min_k_plus_plus_variance_floor(sigma, expected_z):
    result = min_k_plus_plus_scores([[-0.5]], [[-0.4]], [[sigma]])
    assert result.agg_value == pytest.approx(expected_z)


def test_min_k_plus_plus_from_logits_matches_a_direct_computation():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 6))
    labels = [3, 0, 5, 1]
    # direct float64 computation, OU's formulas
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    logp = np.log(probs)
    label_logp = logp[np.arange(4), labels]
    mu = (probs * logp).sum(axis=1)
    sigma = np.sqrt((probs * logp**2).sum(axis=1) - mu**2)
    z = (label_logp - mu) / sigma
    expected = np.sort(z)[:1].mean()  # k = 0.4 of 4 tokens: int(1.6) = 1
    got_mu, got_sigma = token_mu_sigma(logits)
    assert min_k_plus_plus_scores([label_logp], [got_mu], [got_sigma]).agg_value == pytest.approx(expected)


def test_min_k_plus_plus_checks_alignment_and_sigma():
    with pytest.raises(ValueError, match=r"token_logprobs\[0\] and token_mu\[0\] differ in length"):
        min_k_plus_plus_scores([[-1.0, -2.0]], [[0.0]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match=r"token_sigma\[0\] has a negative value"):
        min_k_plus_plus_scores([[-1.0]], [[0.0]], [[-1.0]])
    with pytest.raises(ValueError, match=r"token_mu\[0\] contains NaN"):
        min_k_plus_plus_scores([[-1.0]], [[float("nan")]], [[1.0]])


# --------------------------------------------------------------------------- reference attack


def test_reference_score_is_reference_nll_minus_target_nll():
    target = [[-1.0, -2.0], [-0.5]]
    reference = [[-2.0, -2.0], [-0.5]]
    # target mean NLL 1.5, reference 2.0 -> 2.0 - 1.5 = 0.5; second: 0.5 - 0.5 = 0
    result = reference_scores(target, reference)
    assert per_example(result) == pytest.approx([0.5, 0.0])
    assert result.agg_value == pytest.approx(0.25)


def test_reference_score_uses_means_not_sums():
    result = reference_scores([[-1.0, -3.0]], [[-1.0, -1.0]])
    # means: target NLL 2, reference NLL 1 -> 1 - 2 = -1 (a difference of sums would give -2)
    assert result.agg_value == pytest.approx(-1.0)


def test_reference_score_requires_the_same_tokens():
    with pytest.raises(ValueError, match="differ in length"):
        reference_scores([[-1.0, -2.0]], [[-1.0]])
    with pytest.raises(ValueError, match="target_token_logprobs and reference_token_logprobs differ"):
        reference_scores([[-1.0]], [[-1.0], [-2.0]])


# --------------------------------------------------------------------------- AUC and layout


def _roc_auc_by_pairs(positive, negative):
    """P(positive > negative) + 1/2 P(tie), counted over every pair: ROC AUC with the
    positive class scoring higher, as sklearn's roc_auc_score defines it."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def test_members_clearly_more_familiar_give_auc_one():
    forget = loss_scores([[-0.1, -0.1], [-0.2]])  # low loss: familiar
    holdout = loss_scores([[-2.0, -2.0], [-3.0, -2.5]])
    assert attack_auc(forget, holdout).agg_value == 1.0
    assert attack_auc(holdout, forget).agg_value == 0.0


def test_attack_auc_counts_ties_half():
    # pairs: 3>2, 3>0, 1<2, 1>0, 2=2 (1/2), 2>0 -> 4.5 / 6
    assert attack_auc([3.0, 1.0, 2.0], [2.0, 0.0]).agg_value == pytest.approx(0.75)


def test_mia_result_layout_signs_and_auc():
    forget = loss_scores([[-0.1, -0.3], [-1.0]])  # member scores -0.2, -1.0
    holdout = loss_scores([[-0.5], [-2.0], [-0.2]])  # member scores -0.5, -2.0, -0.2
    result = mia_result(forget, holdout)
    assert set(result) == {"forget", "holdout", "auc", "agg_value"}
    # written with OU's sign: mean NLL
    assert [v["score"] for v in result["forget"]["value_by_index"].values()] == pytest.approx([0.2, 1.0])
    assert result["forget"]["agg_value"] == pytest.approx(0.6)
    assert [v["score"] for v in result["holdout"]["value_by_index"].values()] == pytest.approx([0.5, 2.0, 0.2])
    assert list(result["holdout"]["value_by_index"]) == ["0", "1", "2"]
    # OU: roc_auc_score with holdout as the positive class (label 1) on the NLL statistic
    ou_auc = _roc_auc_by_pairs(positive=[0.5, 2.0, 0.2], negative=[0.2, 1.0])
    # pairs (holdout NLL vs forget NLL): 0.5>0.2, 0.5<1, 2>0.2, 2>1, 0.2=0.2, 0.2<1 -> 3.5 / 6
    assert ou_auc == pytest.approx(3.5 / 6)
    assert result["auc"] == pytest.approx(ou_auc)
    assert result["agg_value"] == result["auc"]


def test_mia_result_is_strict_json_with_infinite_scores():
    result = mia_result([-math.inf, -1.0], [0.0])  # a token of probability 0 -> NLL +inf
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text)["forget"]["value_by_index"]["0"]["score"] is None
    assert result["forget"]["agg_value"] is None  # mean of +inf and 1
    assert result["holdout"]["value_by_index"]["0"]["score"] == 0.0
    assert not math.copysign(1.0, result["holdout"]["value_by_index"]["0"]["score"]) < 0  # no -0.0
    assert result["auc"] == 0.0  # both forget texts look less familiar than the holdout one


def test_mia_result_rejects_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        mia_result([float("nan"), 1.0], [0.0])


# --------------------------------------------------------------------------- PrivLeak


@pytest.mark.parametrize("auc_forget, auc_retain", [(0.9, 0.45), (0.5, 0.5), (0.3, 0.6), (0.99, 0.2)])
def test_text_metrics_privleak_is_ou_formula_on_attack_aucs(auc_forget, auc_retain):
    # OU privacy.py: s = 1 - auc; r = 1 - auc_retain; (s - r) / (r + 1e-10) * 100
    s, r = 1.0 - auc_forget, 1.0 - auc_retain
    ou_value = (s - r) / (r + 1e-10) * 100.0
    assert privleak(auc_forget, auc_retain).agg_value == pytest.approx(ou_value, rel=1e-8, abs=1e-8)


def test_privleak_worked_example():
    # AUC 0.9 (forget looks familiar), retained model 0.45: s = 0.1, r = 0.55,
    # (0.1 - 0.55) / 0.55 * 100 = -81.81...
    assert privleak(0.9, 0.45).agg_value == pytest.approx(-4500 / 55, rel=1e-8)
    # Where OU divides by 1e-10 (retain AUC exactly 1), text_metrics returns NaN instead.
    assert math.isnan(privleak(0.9, 1.0).agg_value)
