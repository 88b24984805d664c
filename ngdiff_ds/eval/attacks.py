"""Memorisation metrics and membership-inference attack scores, as pure NumPy functions.

They compute, from per-example per-token values the runner gathers (no model, no torch), the
metrics open-unlearning (OU, github.com/locuslab/open-unlearning) reports:

* ``exact_memorization``: OU ``exact_memorization`` (``src/evals/metrics/memorization.py``).
* ``extraction_strength``: OU ``extraction_strength`` (``src/evals/metrics/memorization.py``).
* ``loss_scores``: OU ``mia_loss`` (``src/evals/metrics/mia/loss.py``).
* ``zlib_scores``: OU ``mia_zlib`` (``src/evals/metrics/mia/zlib.py``).
* ``min_k_plus_plus_scores`` and ``token_mu_sigma``: OU ``mia_min_k_plus_plus``
  (``src/evals/metrics/mia/min_k_plus_plus.py``).
* ``reference_scores``: OU ``mia_reference`` (``src/evals/metrics/mia/reference.py``).
* ``attack_auc`` and ``mia_result``: OU ``mia_auc`` (``src/evals/metrics/mia/utils.py``) and
  the result layout of ``Attack.attack`` (``src/evals/metrics/mia/all_attacks.py``).

OU ``mia_min_k`` is ``text_metrics.min_k_percent_scores`` followed by ``mia_result``; OU
``privleak`` (``src/evals/metrics/privacy.py``) is ``text_metrics.privleak`` with its default
``auc_orientation``. OU ``mia_gradnorm`` needs per-example gradients and is not here.

Sign convention. Every membership score here is oriented so that HIGHER = MORE LIKELY A
MEMBER (a training text), the convention of ``text_metrics.auc``. OU's statistics have the
opposite sign (higher = less familiar, like a loss); ``mia_result`` writes OU's sign to the
results file so that per-example values compare with OU's files number for number.

Which tokens the runner passes (OU's choices, which differ between metrics):

* ``loss``, ``zlib``, ``reference``: every labelled (answer) token, the final one included,
  because OU takes them from ``evaluate_probability`` (``src/evals/metrics/utils.py``).
* exact memorisation, extraction strength, Min-K%++ (and Min-K%): every labelled token except
  the last one, because OU's ``tokenwise_logprobs`` / ``tokenwise_vocab_logprobs`` drop the last
  labelled position (meant as the EOS; on MUSE's text data it is a content token).

Deliberate differences from OU: an example with no tokens raises ``ValueError`` (OU writes
EM ``None``, ES ``0`` and attack score ``0``), NaN inputs raise ``ValueError``, and all
arithmetic is float64 (OU works in the model's dtype for the vocabulary statistics).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Literal, Sequence

import numpy as np

from ngdiff_ds.eval.results import (MetricResult, as_float64, as_ragged, by_index,
                                    require_examples, require_same_length, scores_of)
from ngdiff_ds.eval.text_metrics import MinKRounding, auc, min_k_percent_score

ExtractionConvention = Literal["open_unlearning", "definition"]

# OU clamps the per-position variance of the vocabulary log-probabilities from below before
# taking its square root, so a near one-hot next-token distribution cannot divide by zero.
OU_MIN_K_PLUS_PLUS_VARIANCE_FLOOR = 1e-6


# --------------------------------------------------------------------------- input checks


def _token_rows(rows: Any, name: str) -> list[np.ndarray]:
    """Per-example float64 token arrays, each non-empty and NaN-free."""
    arrays = as_ragged(rows, name)
    require_examples(len(arrays), name)
    for index, array in enumerate(arrays):
        if len(array) == 0:
            raise ValueError(f"{name}[{index}] has no tokens")
        if np.any(np.isnan(array)):
            raise ValueError(f"{name}[{index}] contains NaN")
    return arrays


def _match_rows(rows: Any, name: str) -> list[np.ndarray]:
    """Per-example 0/1 arrays (bools accepted)."""
    arrays = _token_rows(rows, name)
    for index, array in enumerate(arrays):
        if not np.all((array == 0.0) | (array == 1.0)):
            raise ValueError(f"{name}[{index}] must hold only 0/1 (or bool) values")
    return arrays


def _require_aligned(name_a: str, rows_a: list[np.ndarray], name_b: str, rows_b: list[np.ndarray]) -> None:
    """Same number of examples and, per example, the same number of tokens."""
    require_same_length(name_a, rows_a, name_b, rows_b)
    for index, (a, b) in enumerate(zip(rows_a, rows_b)):
        if len(a) != len(b):
            raise ValueError(f"{name_a}[{index}] and {name_b}[{index}] differ in length: {len(a)} != {len(b)}")


def _per_example_result(scores: Sequence[float]) -> MetricResult:
    """Per-example values under OU's key ``score``; aggregate: their mean."""
    values = np.asarray(scores, dtype=np.float64)
    return MetricResult(float(values.mean()), by_index(score=values))


# --------------------------------------------------------------------------- memorisation


def exact_memorization(token_matches: Any) -> MetricResult:
    """Exact memorisation: the fraction of answer tokens the model predicts exactly.

    ``token_matches[i][t]`` is 1 (or True) when the teacher-forced argmax prediction at answer
    token ``t`` of example ``i`` equals the label. Per example ``EM = sum(matches) / n``
    (key ``score``); aggregate: the mean over examples. As OU ``exact_memorization``
    (``src/evals/metrics/memorization.py``), whose tokens exclude the last labelled one.
    An example with no tokens raises ``ValueError`` (OU stores ``None`` and skips it).
    """
    rows = _match_rows(token_matches, "token_matches")
    return _per_example_result([row.mean() for row in rows])


def extraction_strength(
    token_matches: Any, *, convention: ExtractionConvention = "open_unlearning"
) -> MetricResult:
    """Extraction strength: how long a suffix of the answer the model reproduces exactly.

    ``token_matches`` as for ``exact_memorization``. Per example with ``n`` tokens, ``k`` is
    the smallest position such that every prediction from ``k`` to the end matches, and
    ``ES = 1 - k / n`` (key ``score``); aggregate: the mean over examples.

    ``convention="open_unlearning"`` (default) matches OU ``extraction_strength``
    (``src/evals/metrics/memorization.py``) exactly, including its off-by-one: OU searches
    ``k`` over ``0 .. n-1`` only and, when no suffix matches (the last token is wrong), keeps
    ``k = n - 1``, so such an example scores ``1/n`` rather than 0 (a one-token answer scores
    1 either way). ``"definition"`` takes ``k = n`` then, giving 0. An example with no tokens
    raises ``ValueError`` (OU stores 0 and averages it in).
    """
    if convention not in ("open_unlearning", "definition"):
        raise ValueError(f"convention must be 'open_unlearning' or 'definition', got {convention!r}")
    rows = _match_rows(token_matches, "token_matches")
    return _per_example_result([_extraction_strength_of(row, convention) for row in rows])


def _matched_suffix_start(matches: np.ndarray) -> int:
    """Smallest k with matches[k:] all 1; len(matches) when the last token mismatches."""
    mismatches = np.flatnonzero(matches == 0.0)
    return 0 if len(mismatches) == 0 else int(mismatches[-1]) + 1


def _extraction_strength_of(matches: np.ndarray, convention: ExtractionConvention) -> float:
    n = len(matches)
    k = _matched_suffix_start(matches)
    if convention == "open_unlearning":
        k = min(k, n - 1)  # OU's search loop ends at n-1 and leaves k there
    return 1.0 - k / n


# --------------------------------------------------------------------------- attack scores


def loss_scores(token_logprobs: Any) -> MetricResult:
    """LOSS attack (Yeom et al., 2018): member score = mean token log-probability.

    OU ``mia_loss`` (``src/evals/metrics/mia/loss.py``) scores an example by its mean token
    NLL (``avg_loss`` of ``evaluate_probability``: summed NLL over the labelled tokens, the
    last one included, divided by their count). Here ``score = mean(log p) = -avg_loss``, so
    higher = member. Aggregate: the mean score.
    """
    rows = _token_rows(token_logprobs, "token_logprobs")
    return _per_example_result([row.mean() for row in rows])


def zlib_compressed_length(text: str) -> int:
    """Bytes of the text's UTF-8 encoding after ``zlib.compress`` at its default level."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_scores(token_logprobs: Any, texts: Sequence[str]) -> MetricResult:
    """zlib attack (Carlini et al., 2021): member score = -(mean NLL) / zlib length.

    OU ``mia_zlib`` (``src/evals/metrics/mia/zlib.py``) scores ``avg_loss /
    len(zlib.compress(text.encode("utf-8")))``: the MEAN token NLL (not the sum) over the
    labelled tokens, over the compressed byte length of the labelled text (OU decodes the
    labelled tokens with ``skip_special_tokens=True``; pass that text). Here ``score =
    mean(log p) / zlib_compressed_length(text)``, the negative, so higher = member.
    Aggregate: the mean score.
    """
    rows = _token_rows(token_logprobs, "token_logprobs")
    require_same_length("token_logprobs", rows, "texts", texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
    return _per_example_result([row.mean() / zlib_compressed_length(text) for row, text in zip(rows, texts)])


def token_mu_sigma(logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of log p under the model's own next-token distribution.

    ``logits`` is one example's ``[positions, vocab]`` array (NumPy, or a torch tensor of any
    dtype and device). Per position, with ``p = softmax(logits)`` computed in float64:
    ``mu = sum_v p_v log p_v`` and ``sigma = sqrt(sum_v p_v (log p_v - mu)^2)``, which equals
    ``sqrt(sum_v p_v (log p_v)^2 - mu^2)`` (OU's form) without its cancellation error. Tokens
    with ``-inf`` logits have ``p = 0`` and contribute nothing. Returns float64 ``(mu, sigma)``,
    each of length ``positions``. OU's variance floor is applied in ``min_k_plus_plus_scores``.
    """
    values = _as_2d_float64(logits, "logits")
    if np.any(np.isnan(values)) or np.any(values == np.inf):
        raise ValueError("logits contain NaN or +inf")
    row_max = values.max(axis=-1, keepdims=True)
    if not np.all(np.isfinite(row_max)):
        raise ValueError("logits have a position where every logit is -inf")
    shifted = values - row_max  # exp cannot overflow after this
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    p = np.exp(log_p)
    # A zero-probability token adds nothing, but 0 * -inf is NaN: give it a finite log p.
    log_p = np.where(p > 0.0, log_p, 0.0)
    mu = (p * log_p).sum(axis=-1)
    variance = (p * (log_p - mu[:, None]) ** 2).sum(axis=-1)
    return mu, np.sqrt(variance)


def _as_2d_float64(values: Any, name: str) -> np.ndarray:
    return as_float64(values, name, ndim=2, shape_name=" [positions, vocab]")


def min_k_plus_plus_scores(
    token_logprobs: Any,
    token_mu: Any,
    token_sigma: Any,
    k: float = 0.4,
    *,
    rounding: MinKRounding = "floor",
) -> MetricResult:
    """Min-K%++ attack (Zhang et al., 2024): mean of the lowest k fraction of standardised log p.

    Per token ``z = (log p - mu) / sqrt(max(sigma^2, 1e-6))``, with ``mu``, ``sigma`` from
    ``token_mu_sigma`` at that position; the example's score is the mean of its
    ``max(1, floor(k*n))`` lowest ``z`` (``text_metrics.min_k_percent_score``; higher =
    member). Aggregate: the mean score.

    As OU ``mia_min_k_plus_plus`` (``src/evals/metrics/mia/min_k_plus_plus.py``, k = 0.4 in
    its TOFU and MUSE configs), which clamps the variance at 1e-6 before the square root and
    stores the negative. Count of kept tokens: OU uses ``max(1, int(k*n))`` on the raw float
    product; ``text_metrics`` rounds ``k*n`` to 9 decimals first. The two agree for k = 0.4
    (every n below 100000) but not always (k = 0.7, n = 90: OU keeps 62, here 63).
    """
    logprob_rows = _token_rows(token_logprobs, "token_logprobs")
    mu_rows = _token_rows(token_mu, "token_mu")
    sigma_rows = _token_rows(token_sigma, "token_sigma")
    _require_aligned("token_logprobs", logprob_rows, "token_mu", mu_rows)
    _require_aligned("token_logprobs", logprob_rows, "token_sigma", sigma_rows)
    scores = []
    for index, (logprobs, mu, sigma) in enumerate(zip(logprob_rows, mu_rows, sigma_rows)):
        if np.any(sigma < 0.0):
            raise ValueError(f"token_sigma[{index}] has a negative value")
        spread = np.sqrt(np.maximum(sigma**2, OU_MIN_K_PLUS_PLUS_VARIANCE_FLOOR))
        scores.append(min_k_percent_score((logprobs - mu) / spread, k, rounding=rounding))
    return _per_example_result(scores)


def reference_scores(target_token_logprobs: Any, reference_token_logprobs: Any) -> MetricResult:
    """Reference-model attack: member score = reference mean NLL - target mean NLL.

    OU ``mia_reference`` (``src/evals/metrics/mia/reference.py``) scores ``target avg_loss -
    reference avg_loss``, both MEAN token NLLs over the same labelled tokens (last one
    included). Here the negative, ``mean(target log p) - mean(reference log p)``: higher when
    the target model finds the text more familiar than the reference model does. Both inputs
    must have the same tokens per example. Aggregate: the mean score.
    """
    target = _token_rows(target_token_logprobs, "target_token_logprobs")
    reference = _token_rows(reference_token_logprobs, "reference_token_logprobs")
    _require_aligned("target_token_logprobs", target, "reference_token_logprobs", reference)
    return _per_example_result([t.mean() - r.mean() for t, r in zip(target, reference)])


# --------------------------------------------------------------------------- AUC and layout


def attack_auc(member_scores: Any, nonmember_scores: Any) -> MetricResult:
    """``text_metrics.auc``: P(member score > non-member score), ties 1/2.

    With member-oriented scores this is the number OU reports: OU ``mia_auc``
    (``src/evals/metrics/mia/utils.py``) calls ``roc_auc_score`` with forget labelled 0,
    holdout 1, on its statistic where higher = less familiar, which is P(holdout statistic >
    forget statistic) = P(forget looks more familiar than holdout) =
    ``attack_auc(forget member scores, holdout member scores)``. 1.0: every forget text looks
    more familiar than every holdout text.
    """
    return auc(member_scores, nonmember_scores)


def mia_result(forget_scores: Any, holdout_scores: Any) -> dict[str, Any]:
    """An OU ``mia_*`` results entry from member-oriented forget and holdout scores.

    Arguments: per-example scores (higher = member) or the ``MetricResult`` of a score function
    here or of ``text_metrics.min_k_percent_scores``. Returns OU's layout (``mia_auc`` in
    ``src/evals/metrics/mia/utils.py``, ``Attack.attack`` in ``all_attacks.py``)::

        {"forget": {"agg_value": mean, "value_by_index": {"0": {"score": s}, ...}},
         "holdout": {...}, "auc": AUC, "agg_value": AUC}

    where ``s`` is OU's statistic, the NEGATIVE of the member score (higher = less familiar:
    mean NLL, Min-K% of -log p, ...) so the file compares with OU's, ``mean`` is the mean of
    those ``s``, and ``AUC = attack_auc(forget, holdout)``. Strict-JSON-ready: non-finite
    numbers are ``None``. Write it into the results file as is (``results.to_results`` keeps
    only ``agg_value`` of such a dict).
    """
    forget = scores_of(forget_scores, "forget_scores")
    holdout = scores_of(holdout_scores, "holdout_scores")
    auc_value = _finite_or_none(attack_auc(forget, holdout).agg_value)
    return {
        "forget": _ou_signed_entry(forget),
        "holdout": _ou_signed_entry(holdout),
        "auc": auc_value,
        "agg_value": auc_value,
    }


def _ou_signed_entry(member_scores: np.ndarray) -> dict[str, Any]:
    ou_statistic = -member_scores + 0.0  # + 0.0 turns -0.0 into 0.0 for the JSON
    return _per_example_result(ou_statistic).to_dict()


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
