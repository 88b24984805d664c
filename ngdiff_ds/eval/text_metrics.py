"""MUSE unlearning metrics (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for
Language Models"), as pure functions: verbatim memorisation (VerbMem), knowledge memorisation
(KnowMem), Min-K% Prob membership scores (Shi et al., 2024, "Detecting Pretraining Data from
Large Language Models"), their ROC AUC, and PrivLeak.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np
from scipy.stats import rankdata

from ngdiff_ds.eval.results import (MetricResult, RougeVariant, agg_of, as_float64, by_index,
                                    require_examples, rouge_l, scores_of)

MinKRounding = Literal["floor", "ceil"]
AucOrientation = Literal["members_higher", "muse"]


def verbatim_memorisation(
    predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False,
    inputs: Sequence[str] | None = None,
) -> MetricResult:
    """MUSE "VerbMem": ROUGE-L F1 of greedy continuations of forget-text prefixes.

    Per example ``score(target=true_continuation, prediction=generated).fmeasure``; aggregate:
    mean (MUSE's tables show it x100). ``use_stemmer=False`` as in MUSE's released code
    (open-unlearning uses True). Per-example key: ``rougeL_f1`` (and the other fields of
    ``results.rouge_l``; ``inputs``: the prompts).
    """
    return rouge_l(predictions, references, "f1", use_stemmer, inputs)


def knowledge_memorisation(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    rouge_variant: RougeVariant = "f1",
    use_stemmer: bool = False,
    inputs: Sequence[str] | None = None,
) -> MetricResult:
    """MUSE "KnowMem": ROUGE-L between generated and true answers to QA pairs.

    Default ``rouge_variant="f1"``: MUSE's released ``eval.py`` aggregates KnowMem with
    ``knowmem_agg_key='mean_rougeL'``, which its logger fills with ``.fmeasure`` (it logs
    recall only as ``rougeL_recall``, unused for the reported number), and open-unlearning's
    ``forget_knowmem_ROUGE`` uses ``rouge_type: rougeL_f1``. ``"recall"`` gives the TOFU-style
    variant. Aggregate: mean (x100 in MUSE's tables). Per-example key: ``rougeL_<variant>``.
    """
    return rouge_l(predictions, references, rouge_variant, use_stemmer, inputs)


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
    values = as_float64(token_logprobs, "token_logprobs")
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
    require_examples(len(texts_token_logprobs), "texts_token_logprobs")
    scores = np.array([min_k_percent_score(row, k, rounding=rounding) for row in texts_token_logprobs])
    return MetricResult(float(scores.mean()), by_index(score=scores))


def auc(member_scores: Any, nonmember_scores: Any) -> MetricResult:
    """ROC AUC of a membership score: P(member score > non-member score), ties counting 1/2.

    Computed as the Mann-Whitney U statistic of the members over ``n_members * n_nonmembers``
    (average ranks give each tied pair 1/2), which equals the area under the ROC curve.
    1.0: every member scores above every non-member; 0.5: no separation. Arguments are
    per-example scores (higher = member, e.g. ``min_k_percent_score``) or the
    ``min_k_percent_scores`` results.
    """
    members = scores_of(member_scores, "member_scores")
    nonmembers = scores_of(nonmember_scores, "nonmember_scores")
    require_examples(len(members), "member_scores")
    require_examples(len(nonmembers), "nonmember_scores")
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
    unlearned, retain = agg_of(auc_unlearned), agg_of(auc_retain)
    if auc_orientation == "members_higher":
        unlearned, retain = 1.0 - unlearned, 1.0 - retain
    elif auc_orientation != "muse":
        raise ValueError(f"auc_orientation must be 'members_higher' or 'muse', got {auc_orientation!r}")
    if retain == 0.0:
        return MetricResult(math.nan)
    return MetricResult(float((unlearned - retain) / retain * 100.0))
