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


def reference_token_moments(model, tokenizer, text: str) -> tuple[list[float], list[float]]:
    """Mean and standard deviation of log p over the vocabulary at each scored position,
    from the full float64 distribution, as Min-K%++ standardises by them."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)[:-1]
    probs = logprobs.exp()
    mu = (probs * logprobs).sum(-1)
    variance = (probs * (logprobs - mu[:, None]) ** 2).sum(-1)
    return mu.tolist(), variance.sqrt().tolist()


def _auc(members, nonmembers):
    pairs = [(m > n) + 0.5 * (m == n) for m in members for n in nonmembers]
    return sum(pairs) / len(pairs)


def test_evaluate_muse_against_hand_computed_values(tiny_assets, model_and_tokenizer):
    import zlib

    from rouge_score import rouge_scorer

    from ngdiff_ds.eval.suite import Reference

    model, tokenizer = model_and_tokenizer
    forget = [{"text": t} for t in texts(tiny_assets, 4)]
    holdout = [{"text": r["text"]} for r in load_text_split(tiny_assets["data"], "holdout_text")]
    holdout.append({"text": "The capital of France is Paris."})
    verbmem = load_verbmem_split(tiny_assets["data"], "forget10_verbmem")
    reference_nll = {"forget": [2.0 + 0.1 * i for i in range(len(forget))],
                     "holdout": [2.5 - 0.05 * i for i in range(len(holdout))]}
    reference = Reference(mia_auc=0.3, text_nll=reference_nll)
    results = evaluate_muse(PlainEngine(model), tokenizer,
                            {"verbmem": verbmem, "forget_text": forget, "holdout_text": holdout},
                            reference=reference, max_length=512, batch_size=2,
                            verbmem_max_new_tokens=16)

    logprobs = {name: [reference_token_logprobs(model, tokenizer, r["text"]) for r in records]
                for name, records in (("forget", forget), ("holdout", holdout))}
    member = [_min_k(values) for values in logprobs["forget"]]
    nonmember = [_min_k(values) for values in logprobs["holdout"]]
    expected_auc = _auc(member, nonmember)
    assert results["mia_min_k"]["agg_value"] == pytest.approx(expected_auc)
    assert results["mia_min_k"]["auc"] == pytest.approx(expected_auc)
    assert [v["score"] for v in results["forget_text_min_k"].value_by_index.values()] == \
        pytest.approx(member, rel=1e-4)
    # open-unlearning writes its statistic (higher = less familiar): minus the member score
    ou_forget = results["mia_min_k"]["forget"]["value_by_index"]
    assert [ou_forget[str(i)]["score"] for i in range(len(forget))] == \
        pytest.approx([-m for m in member], rel=1e-4)
    # MUSE: PrivLeak = (AUC - AUC_retain) / AUC_retain * 100 with AUCs oriented as 1 - ours
    expected_privleak = ((1 - expected_auc) - (1 - 0.3)) / (1 - 0.3) * 100
    assert results["privleak"].agg_value == pytest.approx(expected_privleak)

    # the other attacks, each from its definition on the float64 log-probs
    mean_logprob = {name: [sum(v) / len(v) for v in rows] for name, rows in logprobs.items()}
    assert results["mia_loss"]["auc"] == pytest.approx(
        _auc(mean_logprob["forget"], mean_logprob["holdout"]))
    zlib_member = {name: [m / len(zlib.compress(r["text"].encode("utf-8")))
                          for m, r in zip(mean_logprob[name], records)]
                   for name, records in (("forget", forget), ("holdout", holdout))}
    assert results["mia_zlib"]["auc"] == pytest.approx(
        _auc(zlib_member["forget"], zlib_member["holdout"]))
    plus_plus = {}
    for name, records in (("forget", forget), ("holdout", holdout)):
        plus_plus[name] = []
        for record, values in zip(records, logprobs[name]):
            mu, sigma = reference_token_moments(model, tokenizer, record["text"])
            plus_plus[name].append(_min_k([(v - m) / max(s, 1e-3)
                                           for v, m, s in zip(values, mu, sigma)]))
    ou_plus_plus = results["mia_min_k_plus_plus"]["forget"]["value_by_index"]
    assert [-ou_plus_plus[str(i)]["score"] for i in range(len(forget))] == \
        pytest.approx(plus_plus["forget"], rel=1e-3)
    assert results["mia_min_k_plus_plus"]["auc"] == pytest.approx(
        _auc(plus_plus["forget"], plus_plus["holdout"]))
    reference_member = {name: [ref + m for ref, m in zip(reference_nll[name], mean_logprob[name])]
                        for name in reference_nll}
    assert results["mia_reference"]["auc"] == pytest.approx(
        _auc(reference_member["forget"], reference_member["holdout"]))

    # MUSE scores against the ground truth's first 128 tokens
    cut_gts = [tokenizer.decode(tokenizer(r["gt"])["input_ids"][:128], skip_special_tokens=True)
               for r in verbmem]
    assert any(len(gt) < len(r["gt"]) for gt, r in zip(cut_gts, verbmem))  # the cut is exercised
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected_rouge = [scorer.score(gt, reference_continuation(model, tokenizer, r["prompt"], 16))
                      ["rougeL"].fmeasure for gt, r in zip(cut_gts, verbmem)]
    assert results["forget_verbmem_ROUGE"].agg_value == pytest.approx(sum(expected_rouge) / len(expected_rouge))
    row = results["forget_verbmem_ROUGE"].value_by_index["0"]
    assert row["input"] == verbmem[0]["prompt"] and row["ground_truth"] == cut_gts[0]
    assert row["generation"] == reference_continuation(model, tokenizer, verbmem[0]["prompt"], 16)


def test_verbmem_ground_truth_is_cut_to_128_tokens_as_muse_does(model_and_tokenizer):
    from ngdiff_ds.eval.muse import verbmem_ground_truth

    _, tokenizer = model_and_tokenizer
    words = " ".join(f"word{i}" for i in range(300))
    ids = tokenizer(words)["input_ids"]
    assert len(ids) > 128
    # MUSE: tokenizer(gt).input_ids[:, :128], decoded without special tokens
    assert verbmem_ground_truth(tokenizer, words) == tokenizer.decode(ids[:128],
                                                                      skip_special_tokens=True)
    assert len(verbmem_ground_truth(tokenizer, words)) < len(words)
    assert verbmem_ground_truth(tokenizer, "A short one.") == "A short one."


def test_evaluate_muse_without_reference_has_no_privleak(tiny_assets, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    forget = [{"text": t} for t in texts(tiny_assets, 2)]
    results = evaluate_muse(PlainEngine(model), tokenizer,
                            {"forget_text": forget, "holdout_text": forget[:1]}, max_length=512,
                            batch_size=1)
    assert set(results) == {"forget_text_min_k", "holdout_text_min_k", "mia_min_k", "mia_loss",
                            "mia_zlib", "mia_min_k_plus_plus"}
    # the first forget text is also the only holdout text (scored alike at batch size 1):
    # one exact tie (1/2) and one pair decided by the second text's score
    first, second = (_min_k(reference_token_logprobs(model, tokenizer, r["text"])[:511])
                     for r in forget)
    assert first != second
    assert results["mia_min_k"]["agg_value"] == (0.5 + (1.0 if second > first else 0.0)) / 2


def test_knowmem_as_muse_asks_it(tiny_assets, model_and_tokenizer):
    """MUSE's KnowMem: few-shot prompt, greedy answer cut at the first stop string, ROUGE-L F1
    against the answer; each piece against a hand computation."""
    from rouge_score import rouge_scorer

    from ngdiff_ds.data.records import load_qa_split
    from ngdiff_ds.eval.muse import knowmem_answer, knowmem_prompt

    icl = [{"question": "What is one plus one?", "answer": "two"},
           {"question": "Which colour is snow?", "answer": "white"}]
    assert knowmem_prompt("Who?", icl) == ("Question: What is one plus one?\nAnswer: two\n\n"
                                           "Question: Which colour is snow?\nAnswer: white\n\n"
                                           "Question: Who?\nAnswer: ")
    assert knowmem_answer("Paris\n\nQuestion: x") == "Paris"
    assert knowmem_answer("Paris Question: x") == "Paris "
    assert knowmem_answer("Paris\nQuestion x\n\n") == "Paris"

    model, tokenizer = model_and_tokenizer
    records = [{"question": r["question"], "answer": r["answer"].split()[-1]}
               for r in load_qa_split(tiny_assets["data"], "forget10")[:3]]
    results = evaluate_muse(PlainEngine(model), tokenizer,
                            {"forget_knowmem": records, "knowmem_icl": icl}, batch_size=2,
                            knowmem_max_new_tokens=6)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = []
    for record in records:
        generated = reference_continuation(model, tokenizer,
                                           knowmem_prompt(record["question"], icl), 6)
        for stop in ("\n\n", "\nQuestion", "Question:"):
            generated = generated.split(stop)[0]
        expected.append(scorer.score(record["answer"], generated)["rougeL"].fmeasure)
    assert results["forget_knowmem_ROUGE"].agg_value == pytest.approx(sum(expected) / len(expected))
    assert "retain_knowmem_ROUGE" not in results
