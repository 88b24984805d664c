"""MUSE-style evaluation of a ZeRO-3 engine on text: verbatim memorisation and the
membership attacks behind PrivLeak.

VerbMem follows MUSE: the greedy continuation of each prompt (``verbmem_max_new_tokens``,
128) against the ground truth cut to its first 128 tokens (``tokenizer(gt).input_ids[:128]``,
decoded, as MUSE's ``eval.py`` does), ROUGE-L F1, without stemming unless
``use_stemmer`` (open-unlearning's convention). The membership attacks (``membership.py``:
``mia_loss``, ``mia_zlib``, ``mia_min_k``, ``mia_min_k_plus_plus``, ``mia_reference``)
separate the forget texts from held-out texts; PrivLeak compares the Min-K% AUC with the
retain-only model's. Names follow open-unlearning's MUSE results files; the per-text Min-K%
scores are also kept as ``forget_text_min_k`` and ``holdout_text_min_k`` (mean log-prob of
the lowest 40 %, higher = more familiar) for the table.
"""

from __future__ import annotations

from ngdiff_ds.eval import text_metrics as metrics
from ngdiff_ds.eval.membership import MIN_K_FRACTION, membership_attacks
from ngdiff_ds.eval.results import MetricResult
from ngdiff_ds.eval.runner import greedy_continuations, text_token_statistics

VERBMEM_GT_TOKENS = 128  # MUSE cuts the ground truth to this many tokens (its own bos counted)
# MUSE's KnowMem keeps the answer up to the first of these (metrics/knowmem.py)
KNOWMEM_STOP_STRINGS = ("\n\n", "\nQuestion", "Question:")


def knowmem_prompt(question: str, icl: list[dict]) -> str:
    """MUSE's KnowMem prompt: each few-shot pair as "Question: q\nAnswer: a" and a blank line,
    then the question and "Answer: " (with its trailing space)."""
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    return shots + f"Question: {question}\nAnswer: "


def knowmem_answer(generation: str) -> str:
    """The generation up to MUSE's first stop string."""
    for stop in KNOWMEM_STOP_STRINGS:
        generation = generation.split(stop)[0]
    return generation


def verbmem_ground_truth(tokenizer, gt: str) -> str:
    """The ground truth as MUSE scores it: its first 128 tokens as the tokenizer encodes it
    (with whatever special tokens it adds), decoded without them."""
    ids = tokenizer(gt)["input_ids"][:VERBMEM_GT_TOKENS]
    return tokenizer.decode(ids, skip_special_tokens=True)


def evaluate_muse(engine, tokenizer, sets: dict[str, list[dict]], reference=None,
                  max_length: int = 256, batch_size: int = 32, verbmem_max_new_tokens: int = 128,
                  knowmem_max_new_tokens: int = 32,
                  use_stemmer: bool = False) -> dict[str, MetricResult]:
    """The MUSE text metrics for the sets given.

    ``sets``: ``"verbmem"`` (records with ``prompt`` and ``gt``) gives VerbMem;
    ``"forget_knowmem"`` / ``"retain_knowmem"`` (QA records; ``"knowmem_icl"`` the few-shot
    pairs) give MUSE's KnowMem; ``"forget_text"`` and ``"holdout_text"`` (records with
    ``text``) give the membership
    attacks of forget (members) against held-out text, and with ``reference``
    (``suite.Reference``: the retain-only model's text-based Min-K% AUC and NLLs) PrivLeak and
    ``mia_reference``. Every rank must call this (scoring and generation are collective);
    every rank gets the results.
    """
    results = {}
    if "verbmem" in sets:
        records = sets["verbmem"]
        prompts = [r["prompt"] for r in records]
        continuations = greedy_continuations(engine, tokenizer, prompts, verbmem_max_new_tokens,
                                             batch_size)
        results["forget_verbmem_ROUGE"] = metrics.verbatim_memorisation(
            continuations, [verbmem_ground_truth(tokenizer, r["gt"]) for r in records],
            use_stemmer=use_stemmer, inputs=prompts)
    for part in ("forget", "retain"):
        if f"{part}_knowmem" in sets:
            records = sets[f"{part}_knowmem"]
            prompts = [knowmem_prompt(r["question"], sets.get("knowmem_icl", [])) for r in records]
            generations = greedy_continuations(engine, tokenizer, prompts, knowmem_max_new_tokens,
                                               batch_size, strip=False,
                                               stop_strings=KNOWMEM_STOP_STRINGS)
            results[f"{part}_knowmem_ROUGE"] = metrics.knowledge_memorisation(
                [knowmem_answer(g) for g in generations], [r["answer"] for r in records],
                use_stemmer=use_stemmer, inputs=prompts)
    if "forget_text" in sets and "holdout_text" in sets:
        texts = {name: [r["text"] for r in sets[name]] for name in ("forget_text", "holdout_text")}
        stats = {name: text_token_statistics(engine, tokenizer, texts[name], max_length,
                                             batch_size)
                 for name in texts}
        for name in texts:
            results[f"{name}_min_k"] = metrics.min_k_percent_scores(
                [row["logprobs"] for row in stats[name]], MIN_K_FRACTION)
        results.update(membership_attacks(
            stats["forget_text"], stats["holdout_text"], texts["forget_text"],
            texts["holdout_text"], reference_nll=getattr(reference, "text_nll", None),
            reference_auc=getattr(reference, "mia_auc", None)))
    return results
