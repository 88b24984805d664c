"""TOFU evaluation in one process against independent float64 computations: which answer is
correct for each set, the option probabilities, the memorisation metrics, the QA-side
membership attacks, and model utility over TOFU's 9 components (2 ranks against 1 is in
test_distributed.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ngdiff_ds.data.encoding import encode_qa
from ngdiff_ds.data.records import load_qa_split
from ngdiff_ds.eval.suite import Reference
from ngdiff_ds.eval.tofu import UTILITY_INPUTS, evaluate_tofu
from tests.test_muse_eval import PlainEngine, _auc, _min_k


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"], dtype=torch.float32).eval()
    return model, tokenizer


def answer_tokens(model, tokenizer, question, answer):
    """(log-prob, argmax == label) of each answer token (its eos included), from one
    unpadded float64 forward."""
    example = encode_qa(tokenizer, question, answer, 128)
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    labels = example["labels"]
    rows = []
    for position in range(1, len(labels)):
        if labels[position] != -100:
            log_p = torch.log_softmax(logits[position - 1], -1)
            rows.append((log_p[labels[position]].item(),
                         int(logits[position - 1].argmax()) == labels[position]))
    return rows


def mean_logprob(rows):
    return sum(lp for lp, _ in rows) / len(rows)


@pytest.fixture(scope="module")
def sets(tiny_assets):
    data = tiny_assets["data"]
    return {"forget": load_qa_split(data, "forget10")[:4],
            "retain": load_qa_split(data, "retain_perturbed")[:3],
            "ra": load_qa_split(data, "real_authors")[:3],
            "wf": load_qa_split(data, "world_facts")[:3],
            "holdout": load_qa_split(data, "holdout")[:3]}


@pytest.fixture(scope="module")
def evaluated(model_and_tokenizer, sets):
    model, tokenizer = model_and_tokenizer
    reference = Reference(forget_truth_ratios=[0.5, 0.6, 0.7, 0.8], tofu_mia_auc=0.3)
    return evaluate_tofu(PlainEngine(model), tokenizer, sets, reference=reference, max_length=128,
                         batch_size=3, max_new_tokens=8)


def test_probabilities_and_the_correct_answer_of_each_set(model_and_tokenizer, sets, evaluated):
    model, tokenizer = model_and_tokenizer
    results, _ = evaluated
    for prefix in ("forget", "ra", "wf"):
        expected = [math.exp(mean_logprob(answer_tokens(model, tokenizer, r["question"], r["answer"])))
                    for r in sets[prefix]]
        got = [v["prob"] for v in results[f"{prefix}_Q_A_Prob"].value_by_index.values()]
        assert got == pytest.approx(expected, rel=1e-4)
    for prefix in ("ra", "wf"):
        # real authors and world facts: the correct answer is `answer`, against the perturbed
        normalised, ratios = [], []
        for r in sets[prefix]:
            correct = math.exp(mean_logprob(answer_tokens(model, tokenizer, r["question"], r["answer"])))
            wrong = [math.exp(mean_logprob(answer_tokens(model, tokenizer, r["question"], p)))
                     for p in r["perturbed_answer"]]
            normalised.append(correct / (correct + sum(wrong)))
            geometric = math.exp(sum(math.log(w) for w in wrong) / len(wrong))
            ratios.append(geometric / correct)
        got = [v["prob"] for v in results[f"{prefix}_Q_A_Prob_normalised"].value_by_index.values()]
        assert got == pytest.approx(normalised, rel=1e-4)
        assert results[f"{prefix}_Truth_Ratio"].agg_value == pytest.approx(
            sum(max(0.0, 1 - r) for r in ratios) / len(ratios), rel=1e-4, abs=1e-6)
        assert f"{prefix}_Q_A_PARA_Prob" not in results  # open-unlearning has none for these
    # forget: the paraphrase is the correct answer of the truth ratio, and the options' probs
    record = sets["forget"][1]
    para = math.exp(mean_logprob(answer_tokens(model, tokenizer, record["question"],
                                               record["paraphrased_answer"])))
    wrong = [math.exp(mean_logprob(answer_tokens(model, tokenizer, record["question"], p)))
             for p in record["perturbed_answer"]]
    assert results["forget_Q_A_PARA_Prob"].value_by_index["1"]["prob"] == pytest.approx(para, rel=1e-4)
    assert results["forget_Q_A_PERT_Prob"].value_by_index["1"]["prob"] == pytest.approx(wrong, rel=1e-4)
    ratio = math.exp(sum(math.log(w) for w in wrong) / len(wrong)) / para
    assert results["forget_truth_ratio"].value_by_index["1"]["score"] == pytest.approx(ratio, rel=1e-4)


def test_memorisation_metrics_from_teacher_forced_argmax(model_and_tokenizer, sets, evaluated):
    model, tokenizer = model_and_tokenizer
    results, _ = evaluated
    for index, record in enumerate(sets["forget"]):
        matches = [m for _, m in answer_tokens(model, tokenizer, record["question"],
                                               record["answer"])][:-1]  # OU: not the eos
        n = len(matches)
        assert results["exact_memorization"].value_by_index[str(index)]["score"] == \
            pytest.approx(sum(matches) / n)
        # open-unlearning: the first k from which every prediction matches, at most n - 1
        k = next((k for k in range(n) if all(matches[k:])), n - 1)
        assert results["extraction_strength"].value_by_index[str(index)]["score"] == \
            pytest.approx(1 - k / n)


def test_qa_side_membership_attacks_and_privleak(model_and_tokenizer, sets, evaluated):
    model, tokenizer = model_and_tokenizer
    results, _ = evaluated
    logprobs = {part: [[lp for lp, _ in answer_tokens(model, tokenizer, r["question"], r["answer"])]
                       for r in sets[part]] for part in ("forget", "holdout")}
    # Min-K% on the answer tokens without the eos; loss on all of them
    min_k = {part: [_min_k(values[:-1]) for values in rows] for part, rows in logprobs.items()}
    loss = {part: [sum(v) / len(v) for v in rows] for part, rows in logprobs.items()}
    auc = _auc(min_k["forget"], min_k["holdout"])
    assert results["tofu_mia_min_k"]["auc"] == pytest.approx(auc)
    assert results["tofu_mia_loss"]["auc"] == pytest.approx(_auc(loss["forget"], loss["holdout"]))
    assert results["tofu_privleak"].agg_value == pytest.approx(((1 - auc) - 0.7) / 0.7 * 100)
    assert set(results["tofu_mia_zlib"]) == {"forget", "holdout", "auc", "agg_value"}
    assert "tofu_mia_reference" not in results  # the reference carried no NLLs


def test_model_utility_over_9_components_else_partial(model_and_tokenizer, sets, evaluated):
    from scipy.stats import hmean

    model, tokenizer = model_and_tokenizer
    results, notes = evaluated
    assert results["model_utility"].agg_value == pytest.approx(
        hmean([results[name].agg_value for name in UTILITY_INPUTS]))
    assert "model_utility_partial" not in results and not any("model_utility" in n for n in notes)
    partial, notes = evaluate_tofu(PlainEngine(model), tokenizer,
                                   {k: sets[k] for k in ("forget", "retain", "wf")},
                                   max_length=128, batch_size=3, max_new_tokens=4)
    assert "model_utility" not in partial
    six = [name for name in UTILITY_INPUTS if not name.startswith("ra_")]
    assert partial["model_utility_partial"].agg_value == pytest.approx(
        hmean([partial[name].agg_value for name in six]))
    assert any("3 missing" in n and "ra_Truth_Ratio" in n for n in notes)
    assert any("held-out QA" in n for n in notes)
