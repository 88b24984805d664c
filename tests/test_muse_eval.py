"""MUSE text evaluation in one process against independent computations.

The runner only needs ``engine(...)``, ``engine.module``, ``engine.eval/train`` and
``engine.device``; without a process group it is rank 0 of 1 and calls no collective. So a thin wrapper over the plain
HF model runs the real code, and each value is checked against an unbatched, unpadded float64
computation written here (2 ranks against 1 rank is in test_distributed.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from ngdiff_ds.data.records import load_text_split, load_verbmem_split
from ngdiff_ds.eval.muse import evaluate_muse
from ngdiff_ds.eval.runner import greedy_continuations, text_token_logprobs


class PlainEngine:
    """The part of a DeepSpeed engine the runner uses, over an unpartitioned model."""

    def __init__(self, model):
        self.module = model
        self.device = torch.device("cpu")

    def __call__(self, **inputs):
        return self.module(**inputs)

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"], dtype=torch.float32).eval()
    return model, tokenizer


def reference_token_logprobs(model, tokenizer, text: str) -> list[float]:
    """log p(token_t | bos, tokens_<t) for each token of ``text``, one unpadded sequence."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[t, ids[t + 1]].item() for t in range(len(ids) - 1)]


def reference_continuation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding by hand, one token at a time, no padding, no cache."""
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if next_id == tokenizer.eos_token_id:
                break
            new.append(next_id)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def texts(tiny_assets, count):
    return [r["text"] for r in load_text_split(tiny_assets["data"], "full_text")[:count]]


def test_text_token_logprobs_match_unbatched_float64(tiny_assets, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    sample = texts(tiny_assets, 7) + ["A short one.", "The capital of France is Paris."]
    # batch 3: padded batches with long and short texts together; max_length 128 (the model's
    # positions) cuts the passages, which are then scored up to the cut, and leaves the short
    # texts whole, whose appended eos is then not scored
    scored = text_token_logprobs(PlainEngine(model), tokenizer, sample, 128, 3)
    assert len(scored) == len(sample)
    for text, values in zip(sample, scored):
        expected = reference_token_logprobs(model, tokenizer, text)
        if len(expected) >= 127:
            expected = expected[:127]  # 128 positions: the bos and 127 scored tokens
        assert len(values) == len(expected)
        assert values == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert len(scored[0]) == 127 and len(scored[-1]) < 20


def test_greedy_continuations_match_token_by_token_decoding(tiny_assets, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [t.split(". ")[0] + "." for t in texts(tiny_assets, 5)] + ["In"]
    generated = greedy_continuations(PlainEngine(model), tokenizer, prompts, 12, 4)
    expected = [reference_continuation(model, tokenizer, p, 12) for p in prompts]
    assert generated == expected


def _min_k(values, k=0.4):
    lowest = sorted(values)[:max(1, math.floor(round(k * len(values), 9)))]
    return sum(lowest) / len(lowest)


def test_evaluate_muse_against_hand_computed_values(tiny_assets, model_and_tokenizer):
    from rouge_score import rouge_scorer

    model, tokenizer = model_and_tokenizer
    forget = [{"text": t} for t in texts(tiny_assets, 4)]
    holdout = [{"text": r["text"]} for r in load_text_split(tiny_assets["data"], "holdout_text")]
    holdout.append({"text": "The capital of France is Paris."})
    verbmem = load_verbmem_split(tiny_assets["data"], "forget10_verbmem")
    reference_auc = 0.3
    results = evaluate_muse(PlainEngine(model), tokenizer,
                            {"verbmem": verbmem, "forget_text": forget, "holdout_text": holdout},
                            reference_auc=reference_auc, max_length=512, batch_size=2,
                            verbmem_max_new_tokens=16)

    member = [_min_k(reference_token_logprobs(model, tokenizer, r["text"])) for r in forget]
    nonmember = [_min_k(reference_token_logprobs(model, tokenizer, r["text"])) for r in holdout]
    pairs = [(m > n) + 0.5 * (m == n) for m in member for n in nonmember]
    expected_auc = sum(pairs) / len(pairs)
    assert results["mia_min_k"].agg_value == pytest.approx(expected_auc)
    assert [v["score"] for v in results["forget_text_min_k"].value_by_index.values()] == \
        pytest.approx(member, rel=1e-4)
    # MUSE: PrivLeak = (AUC - AUC_retain) / AUC_retain * 100 with AUCs oriented as 1 - ours
    expected_privleak = ((1 - expected_auc) - (1 - reference_auc)) / (1 - reference_auc) * 100
    assert results["privleak"].agg_value == pytest.approx(expected_privleak)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected_rouge = [scorer.score(r["gt"], reference_continuation(model, tokenizer, r["prompt"], 16))
                      ["rougeL"].fmeasure for r in verbmem]
    assert results["forget_verbmem_ROUGE"].agg_value == pytest.approx(sum(expected_rouge) / len(expected_rouge))


def test_evaluate_muse_without_reference_has_no_privleak(tiny_assets, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    forget = [{"text": t} for t in texts(tiny_assets, 2)]
    results = evaluate_muse(PlainEngine(model), tokenizer,
                            {"forget_text": forget, "holdout_text": forget[:1]}, max_length=512,
                            batch_size=1)
    assert set(results) == {"forget_text_min_k", "holdout_text_min_k", "mia_min_k"}
    # the first forget text is also the only holdout text (scored alike at batch size 1):
    # one exact tie (1/2) and one pair decided by the second text's score
    first, second = (_min_k(reference_token_logprobs(model, tokenizer, r["text"])[:511])
                     for r in forget)
    assert first != second
    assert results["mia_min_k"].agg_value == (0.5 + (1.0 if second > first else 0.0)) / 2
