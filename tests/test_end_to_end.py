"""The README's main command through the real ``deepspeed`` launcher, with a step limit.

It builds the embedded default from scratch (data, tokenizer, two fine-tuned tiny Llamas:
about 7 minutes on 2 CPU cores), unlearns, and the test then checks the outputs against an
independent evaluation of the saved models in this process.
"""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
import torch

from ngdiff_ds.default.assets import VERSION
from tests.conftest import DEEPSPEED, REPO, cpu_env, free_port

pytestmark = pytest.mark.slow  # multi-rank DeepSpeed launches

STEPS = 40
# The forget answers must become clearly less likely, the retain answers must not.
MIN_FORGET_NLL_RATIO = 2.0   # after / before, mean per-example NLL on forget10 (+ passages)
MAX_RETAIN_NLL_INCREASE = 0.15  # after - before, nats, on retain90 (+ passages)


def readme_main_command() -> list[str]:
    """The command of the README's first set-up block (after the install part)."""
    text = (REPO / "README.md").read_text()
    lines = [line for line in text.splitlines()
             if "launch/unlearn.py --deepspeed ds_configs/zero3.json" in line and "--num_gpus 2" in line]
    assert lines, "README lost its main command"
    return shlex.split(lines[0].split("&&")[-1].strip())


def mean_nll(model_dir, data_dir, split) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ngdiff_ds.data.encoding import encode_split
    from ngdiff_ds.data.records import load_training_records

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples, _ = encode_split(tokenizer, load_training_records(str(data_dir), split), 256, split)
    # examples of one length form one batch: no padding, so each row is exactly the forward
    # of that example alone (as tests/reference.py's _example_nll), many times faster
    by_length = {}
    for example in examples:
        by_length.setdefault(len(example["input_ids"]), []).append(example)
    nlls = []
    with torch.no_grad():
        for group in by_length.values():
            logits = model(input_ids=torch.tensor([e["input_ids"] for e in group])).logits
            for row, example in zip(logits, group):
                targets = torch.tensor(example["labels"])[1:]
                keep = targets != -100
                nlls.append(torch.nn.functional.cross_entropy(row[:-1][keep].float(),
                                                              targets[keep]))
    assert len(nlls) == len(examples)
    return torch.stack(nlls).double().mean().item()


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    words = readme_main_command()
    env_assignments = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    command = [w for w in words if w not in {f"{k}={v}" for k, v in env_assignments.items()}]
    assert command[0] == "deepspeed"
    command = [DEEPSPEED, "--master_port", str(free_port()), *command[1:],
               "--max-steps", str(STEPS), "--cache-dir", str(root / "cache"),
               "--output-dir", str(root / "out"), "--log-every", "5"]
    result = subprocess.run(command, cwd=REPO, env=cpu_env(**env_assignments), capture_output=True,
                            text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root, result


def test_writes_metrics_tensorboard_and_summary(main_run):
    root, result = main_run
    rows = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(STEPS))
    for key in ("forget_loss", "retain_loss", "forget_grad_norm", "retain_grad_norm", "cosine",
                "lr", "step_time", "tokens_per_s"):
        assert all(isinstance(r[key], float) for r in train), key
    assert any(r["kind"] == "lr_fit" for r in rows), "the adaptive rate is on by default"
    assert list((root / "out" / "tensorboard").glob("events.out.tfevents.*"))
    assert "NLL of the training targets" in result.stdout


def test_saved_model_forgot_and_kept_utility(main_run):
    root, _ = main_run
    summary = json.loads((root / "out" / "summary.json").read_text())
    data = root / "cache" / VERSION / "data"
    before_model = root / "cache" / VERSION / "model_full"
    after_model = root / "out" / "model"
    assert (after_model / "model.safetensors").is_file()
    # Independent evaluation of both HF directories in this process (no DeepSpeed).
    # The embedded default unlearns each forget author's QA pairs and passage.
    forget_split, retain_split = "forget10+forget10_text", "retain90+retain90_text"
    assert (summary["forget_split"], summary["retain_split"]) == (forget_split, retain_split)
    forget_before = mean_nll(before_model, data, forget_split)
    forget_after = mean_nll(after_model, data, forget_split)
    retain_before = mean_nll(before_model, data, retain_split)
    retain_after = mean_nll(after_model, data, retain_split)
    # The run's own sharded evaluation agrees with it.
    assert summary["before"]["forget_nll"] == pytest.approx(forget_before, rel=1e-3)
    assert summary["after"]["forget_nll"] == pytest.approx(forget_after, rel=1e-3)
    assert summary["after"]["retain_nll"] == pytest.approx(retain_after, rel=1e-3)
    numbers = (f"forget {forget_before:.3f} -> {forget_after:.3f}, "
               f"retain {retain_before:.3f} -> {retain_after:.3f}")
    assert forget_after >= MIN_FORGET_NLL_RATIO * forget_before, numbers
    assert retain_after - retain_before <= MAX_RETAIN_NLL_INCREASE, numbers


def test_retain_only_reference_model_was_built(main_run):
    root, _ = main_run
    reference = root / "cache" / VERSION / "model_retain90"
    data = root / "cache" / VERSION / "data"
    # Trained on retain90 only: it knows the retain authors far better than the forget ones.
    assert mean_nll(reference, data, "forget10") > 2 * mean_nll(reference, data, "retain90")


def test_tofu_metrics_of_the_run(main_run):
    """The TOFU part of the table the main command ends with, and the files behind it."""
    root, result = main_run
    eval_dir = root / "out" / "eval"
    summary = {tag: json.loads((eval_dir / f"{tag}_summary.json").read_text())
               for tag in ("retain_model", "before", "final")}
    before, reference, final = summary["before"], summary["retain_model"], summary["final"]
    # The fine-tuned model knows the forget authors; the retain-only model does not.
    assert before["forget_Q_A_Prob"] > reference["forget_Q_A_Prob"] + 0.2, (before, reference)
    assert before["forget_Q_A_ROUGE"] > reference["forget_Q_A_ROUGE"], (before, reference)
    # ... so their forget-set truth-ratio distributions differ: low forget quality.
    assert before["forget_quality"] < 0.05, before
    # Unlearning moves the forget metrics toward the retain-only model.
    assert final["forget_Q_A_Prob"] < before["forget_Q_A_Prob"]
    assert final["forget_quality"] >= before["forget_quality"]
    # TOFU's 9-component utility (the embedded default has real authors and world facts)
    assert 0 < final["model_utility"] <= 1 and "model_utility_partial" not in final
    # the fine-tuned model has memorised its forget answers; unlearning loosens that
    assert before["extraction_strength"] > reference["extraction_strength"]
    assert final["exact_memorization"] < before["exact_memorization"]
    # QA-side membership: forget QA pairs vs the held-out authors' (TOFU's holdout)
    assert before["tofu_mia_min_k"] > 0.9 and before["tofu_privleak"] < -50, (before, reference)
    # Per-example values in the community schema, one per forget example.
    results = json.loads((eval_dir / "final_results.json").read_text())
    assert len(results["forget_Q_A_Prob"]["value_by_index"]) == 177
    assert set(results["forget_Q_A_ROUGE"]["value_by_index"]["0"]) >= {
        "rougeL_recall", "rougeL_f1", "rouge1_recall", "input", "ground_truth", "generation"}
    # open-unlearning's files of the point: exactly its summary keys, strict JSON
    tofu_summary = json.loads((eval_dir / "final" / "TOFU_SUMMARY.json").read_text())
    assert sorted(tofu_summary) == sorted(["forget_truth_ratio", "forget_quality",
                                           "forget_Q_A_Prob", "forget_Q_A_ROUGE", "model_utility",
                                           "privleak", "extraction_strength"])
    assert tofu_summary["privleak"] == pytest.approx(final["tofu_privleak"])
    tofu_eval = json.loads((eval_dir / "final" / "TOFU_EVAL.json").read_text())
    assert set(tofu_eval["mia_min_k"]) == {"forget", "holdout", "auc", "agg_value"}
    def refuse(token):
        raise AssertionError(f"bare {token} in a results file")
    for path in list((eval_dir / "final").glob("*.json")) + list(eval_dir.glob("*.json")):
        json.loads(path.read_text(), parse_constant=refuse)  # strict JSON: no NaN / Infinity
    assert (eval_dir / "forget_quality_vs_utility.png").stat().st_size > 1000
    assert "forget_quality" in result.stdout and "retain_model" in result.stdout


def test_muse_metrics_of_the_run(main_run):
    """The MUSE part: VerbMem on the forget passages, KnowMem on the QA pairs, and PrivLeak
    from the Min-K% test of forget passages against held-out ones."""
    root, result = main_run
    eval_dir = root / "out" / "eval"
    summary = {tag: json.loads((eval_dir / f"{tag}_summary.json").read_text())
               for tag in ("retain_model", "before", "final")}
    before, reference, final = summary["before"], summary["retain_model"], summary["final"]
    numbers = json.dumps(summary, indent=1)
    # The fine-tuned model recites its forget passages and knows the answers; the retain-only
    # model never saw them.
    # (the retain-only model's VerbMem is far from 0: every passage shares one sentence frame)
    assert before["forget_verbmem_ROUGE"] > reference["forget_verbmem_ROUGE"] + 0.1, numbers
    assert before["forget_qa_knowmem_ROUGE"] > reference["forget_qa_knowmem_ROUGE"] + 0.1, numbers
    # Min-K% tells the trained forget passages from held-out ones; for the retain-only model
    # both are unseen, so it cannot.
    assert before["mia_min_k"] > 0.9 and 0.2 < reference["mia_min_k"] < 0.8, numbers
    assert before["privleak"] < -50, numbers
    # Unlearning (the passages are part of the forget task) moves VerbMem toward the retain-
    # only model and makes the forget passages' rarest tokens less likely. Forty steps do not
    # erase the membership signal (PrivLeak stays near -100), so it is not asserted to move.
    assert final["forget_verbmem_ROUGE"] < before["forget_verbmem_ROUGE"] - 0.05, numbers
    assert final["forget_text_min_k"] < before["forget_text_min_k"], numbers
    assert final["forget_qa_knowmem_ROUGE"] < before["forget_qa_knowmem_ROUGE"], numbers
    assert final["retain_qa_knowmem_ROUGE"] > 0.9, numbers
    # MUSE's own KnowMem (few-shot prompt on the knowmem splits) is there, in [0, 1]
    for summary_of in (before, final):
        assert 0 <= summary_of["forget_knowmem_ROUGE"] <= 1, numbers
        assert 0 <= summary_of["retain_knowmem_ROUGE"] <= 1, numbers
    assert sorted(json.loads((eval_dir / "final" / "MUSE_SUMMARY.json").read_text())) == sorted(
        ["forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE", "privleak",
         "extraction_strength"])
    results = json.loads((eval_dir / "final_results.json").read_text())
    assert len(results["forget_verbmem_ROUGE"]["value_by_index"]) == 10
    assert len(results["forget_text_min_k"]["value_by_index"]) == 10
    assert len(results["holdout_text_min_k"]["value_by_index"]) == 20
    assert "forget_verbmem_ROUGE" in result.stdout and "privleak" in result.stdout


def test_final_scores_follow_from_the_saved_per_example_values(main_run):
    """forget quality and PrivLeak of the final model, recomputed here from the two saved
    results files with scipy and MUSE's formula, equal what the run reported."""
    from scipy.stats import ks_2samp

    root, _ = main_run
    eval_dir = root / "out" / "eval"
    reference = json.loads((eval_dir / "retain_model_results.json").read_text())
    final = json.loads((eval_dir / "final_results.json").read_text())
    summary = json.loads((eval_dir / "final_summary.json").read_text())

    def ratios(results):
        by_index = results["forget_truth_ratio"]["value_by_index"]
        return [by_index[str(i)]["score"] for i in range(len(by_index))]

    assert len(ratios(reference)) == 177
    assert summary["forget_quality"] == pytest.approx(ks_2samp(ratios(final), ratios(reference)).pvalue)
    # MUSE orients the AUC with forget texts as the negative class: 1 - ours
    auc_muse, reference_auc_muse = (1 - final["mia_min_k"]["agg_value"],
                                    1 - reference["mia_min_k"]["agg_value"])
    assert summary["privleak"] == pytest.approx((auc_muse - reference_auc_muse) / reference_auc_muse * 100)
    qa_auc, reference_qa_auc = (1 - final["tofu_mia_min_k"]["auc"],
                                1 - reference["tofu_mia_min_k"]["auc"])
    assert summary["tofu_privleak"] == pytest.approx((qa_auc - reference_qa_auc) / reference_qa_auc * 100)


def test_reference_against_itself_gives_forget_quality_one_and_privleak_zero(main_run):
    """The retain-only model's own saved results, read back as the reference, give exactly 1
    (forget quality) and 0 (PrivLeak), and carry its reported AUC."""
    from ngdiff_ds.eval.metrics import forget_quality
    from ngdiff_ds.eval.text_metrics import privleak
    from ngdiff_ds.eval.suite import Reference

    root, _ = main_run
    reference = Reference.from_file(root / "out" / "eval" / "retain_model_results.json")
    summary = json.loads((root / "out" / "eval" / "retain_model_summary.json").read_text())
    assert reference.mia_auc == summary["mia_min_k"]
    assert len(reference.forget_truth_ratios) == 177
    assert forget_quality(reference.forget_truth_ratios, reference.forget_truth_ratios).agg_value == 1.0
    assert privleak(reference.mia_auc, reference.mia_auc).agg_value == 0.0


def test_evaluate_script_reproduces_the_final_column_on_one_rank(main_run):
    """launch/evaluate.py on the saved model (1 rank, plain python, the retain-only model's
    saved results as the reference) gives the run's final numbers (2 ranks, in-process)."""
    from tests.conftest import PYTHON, single_rank_env

    root, _ = main_run
    eval_dir = root / "out" / "eval"
    command = [PYTHON, "launch/evaluate.py", "--deepspeed", "ds_configs/zero3.json",
               "--model", str(root / "out" / "model"), "--data", str(root / "cache" / VERSION / "data"),
               "--retain-results", str(eval_dir / "retain_model_results.json"),
               "--output-dir", str(root / "evaluate")]
    result = subprocess.run(command, cwd=REPO, env=single_rank_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reproduced = json.loads((root / "evaluate" / "model_summary.json").read_text())
    final = json.loads((eval_dir / "final_summary.json").read_text())
    assert set(reproduced) == set(final)
    for name, value in final.items():
        assert reproduced[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert "privleak" in result.stdout
