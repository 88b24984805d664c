"""The open-unlearning results files: key sets, nulls with reasons, strict JSON, layouts."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from ngdiff_ds.errors import DataError
from ngdiff_ds.eval import ou_files
from ngdiff_ds.eval.ou_files import (
    MUSE_SUMMARY_KEYS,
    TOFU_SUMMARY_KEYS,
    read_ou_summary,
    write_ou_files,
)
from ngdiff_ds.eval.results import MetricResult

# Checked against open-unlearning's configs/eval/tofu.yaml and configs/eval/muse.yaml
# (commit d3d7cf9): the metrics each benchmark's summary lists by default.
OU_TOFU_SUMMARY = ["forget_truth_ratio", "forget_quality", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
                   "model_utility", "privleak", "extraction_strength"]
OU_MUSE_SUMMARY = ["forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE",
                   "privleak", "extraction_strength"]

# A NaN/Infinity token where a JSON value starts (not inside a string).
BARE_NON_FINITE = re.compile(r"[:\[,]\s*-?(NaN|Infinity)\b")


def rouge_rows(*rows):
    return {str(i): {"rouge1_recall": r, "rougeL_f1": r, "rougeL_recall": r, "input": f"Q{i}?",
                     "ground_truth": f"A{i}", "generation": "42"} for i, r in enumerate(rows)}


def attack(forget_scores, holdout_scores, auc):
    def side(scores):
        return {"agg_value": float(np.mean(scores)),
                "value_by_index": {str(i): {"score": s} for i, s in enumerate(scores)}}
    return {"forget": side(forget_scores), "holdout": side(holdout_scores), "auc": auc, "agg_value": auc}


def tofu_results(**replace):
    results = {
        "forget_truth_ratio": MetricResult(0.6, {"0": {"score": 0.5}, "1": {"score": 0.7}}),
        "forget_quality": MetricResult(0.01),
        "forget_Q_A_Prob": MetricResult(0.4, {"0": {"prob": 0.4, "avg_loss": 0.9}}),
        "forget_Q_A_PERT_Prob": MetricResult(0.2, {"0": {"prob": [0.1, 0.3], "avg_loss": [2.3, 1.2]}}),
        "forget_Q_A_ROUGE": MetricResult(0.5, rouge_rows(0.25, 0.75)),
        "model_utility": MetricResult(0.55),
        "privleak": MetricResult(-12.5),
        "mia_min_k": attack([-2.0, -1.0], [-3.0, -4.0], 0.25),
        "extraction_strength": MetricResult(0.125, {"0": {"score": 0.125}}),
    }
    results.update(replace)
    return {name: value for name, value in results.items() if value is not None}


def muse_results(**replace):
    results = {
        "forget_knowmem_ROUGE": MetricResult(0.3, rouge_rows(0.3)),
        "retain_knowmem_ROUGE": MetricResult(0.6, rouge_rows(0.6)),
        "forget_verbmem_ROUGE": MetricResult(0.2, rouge_rows(0.2)),
        "privleak": MetricResult(5.0),
        "mia_min_k": attack([-1.0], [-2.0], 0.75),
        "extraction_strength": MetricResult(0.5),
    }
    results.update(replace)
    return {name: value for name, value in results.items() if value is not None}


def load(path):
    return json.loads(path.read_text())


def test_summary_keys_are_open_unlearnings():
    assert list(TOFU_SUMMARY_KEYS) == OU_TOFU_SUMMARY
    assert list(MUSE_SUMMARY_KEYS) == OU_MUSE_SUMMARY


def test_summaries_hold_exactly_ou_keys_and_the_aggregates(tmp_path):
    tofu, muse = tofu_results(), muse_results()
    written = write_ou_files(tmp_path, tofu, muse)

    assert [p.name for p in written] == [
        "TOFU_EVAL.json", "TOFU_SUMMARY.json", "TOFU_SUMMARY.notes.json",
        "MUSE_EVAL.json", "MUSE_SUMMARY.json", "MUSE_SUMMARY.notes.json"]
    tofu_summary, muse_summary = load(tmp_path / "TOFU_SUMMARY.json"), load(tmp_path / "MUSE_SUMMARY.json")
    assert set(tofu_summary) == set(OU_TOFU_SUMMARY)
    assert set(muse_summary) == set(OU_MUSE_SUMMARY)
    assert tofu_summary == {key: tofu[key].agg_value for key in OU_TOFU_SUMMARY}
    assert muse_summary == {key: muse[key].agg_value for key in OU_MUSE_SUMMARY}
    assert list(tofu_summary) == sorted(tofu_summary)  # OU sorts the keys it saves
    assert load(tmp_path / "TOFU_SUMMARY.notes.json") == {}
    assert read_ou_summary(tmp_path / "MUSE_SUMMARY.json") == muse_summary


def test_eval_file_holds_every_entry_in_the_results_layout(tmp_path):
    tofu = tofu_results(model_utility_partial=MetricResult(0.5))
    write_ou_files(tmp_path, tofu, {})

    entries = load(tmp_path / "TOFU_EVAL.json")
    assert list(entries) == sorted(tofu)
    assert entries["forget_truth_ratio"] == {"agg_value": 0.6, "value_by_index": {"0": {"score": 0.5},
                                                                                  "1": {"score": 0.7}}}
    assert entries["forget_quality"] == {"agg_value": 0.01}  # set-level: no value_by_index, as in OU
    assert entries["forget_Q_A_PERT_Prob"]["value_by_index"]["0"] == {"prob": [0.1, 0.3],
                                                                      "avg_loss": [2.3, 1.2]}
    assert entries["model_utility_partial"] == {"agg_value": 0.5}


def test_a_nan_aggregate_is_null_with_its_reason(tmp_path):
    write_ou_files(tmp_path, tofu_results(forget_quality=MetricResult(math.nan)), muse_results())

    assert load(tmp_path / "TOFU_SUMMARY.json")["forget_quality"] is None
    assert load(tmp_path / "TOFU_EVAL.json")["forget_quality"] == {"agg_value": None}
    assert "NaN" in load(tmp_path / "TOFU_SUMMARY.notes.json")["forget_quality"]
    assert read_ou_summary(tmp_path / "TOFU_SUMMARY.json")["forget_quality"] is None


def test_a_missing_metric_is_null_with_its_reason(tmp_path):
    write_ou_files(tmp_path, tofu_results(extraction_strength=None), muse_results(privleak=None))

    assert load(tmp_path / "TOFU_SUMMARY.json")["extraction_strength"] is None
    assert "not computed" in load(tmp_path / "TOFU_SUMMARY.notes.json")["extraction_strength"]
    muse_notes = load(tmp_path / "MUSE_SUMMARY.notes.json")
    assert load(tmp_path / "MUSE_SUMMARY.json")["privleak"] is None
    assert set(muse_notes) == {"privleak"}


def test_a_missing_model_utility_points_at_the_partial_one(tmp_path):
    tofu = tofu_results(model_utility=None, model_utility_partial=MetricResult(0.4))
    write_ou_files(tmp_path, tofu, {})

    assert load(tmp_path / "TOFU_SUMMARY.json")["model_utility"] is None
    assert "model_utility_partial" in load(tmp_path / "TOFU_SUMMARY.notes.json")["model_utility"]


def test_caller_notes_replace_the_automatic_reason_and_may_annotate_others(tmp_path):
    notes = {"TOFU": {"forget_quality": "no retain-model logs given", "privleak": "retain AUC assumed 0.5"}}
    write_ou_files(tmp_path, tofu_results(forget_quality=MetricResult(None)), {}, notes=notes)

    assert load(tmp_path / "TOFU_SUMMARY.notes.json") == notes["TOFU"]
    assert load(tmp_path / "TOFU_SUMMARY.json")["privleak"] == -12.5


def test_unknown_notes_benchmark_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keyed by benchmark"):
        write_ou_files(tmp_path, tofu_results(), {}, notes={"forget_quality": {"x": "y"}})


def test_no_file_holds_a_non_strict_json_token(tmp_path):
    tofu = tofu_results(
        privleak=MetricResult(math.inf),
        forget_Q_A_Prob=MetricResult(math.nan, {"0": {"prob": math.nan, "avg_loss": -math.inf}}),
        mia_min_k={**attack([-1.0], [-2.0], math.nan), "agg_value": math.nan},
    )
    written = write_ou_files(tmp_path, tofu, muse_results(extraction_strength=MetricResult(-math.inf)))

    for path in written:
        text = path.read_text()
        assert not BARE_NON_FINITE.search(text), path.name  # notes may say "NaN" inside a string
        json.loads(text, parse_constant=lambda token: pytest.fail(f"{path.name} has {token}"))
    notes = load(tmp_path / "TOFU_SUMMARY.notes.json")
    assert "+inf" in notes["privleak"] and "NaN" in notes["forget_Q_A_Prob"]
    assert "-inf" in load(tmp_path / "MUSE_SUMMARY.notes.json")["extraction_strength"]
    assert load(tmp_path / "TOFU_EVAL.json")["forget_Q_A_Prob"]["value_by_index"]["0"] == {
        "prob": None, "avg_loss": None}


def test_attack_dicts_keep_their_layout(tmp_path):
    tofu_attack, muse_attack = attack([-2.0, -1.0], [-3.0], 0.25), attack([-1.0], [-2.0], 0.75)
    write_ou_files(tmp_path, tofu_results(mia_loss=tofu_attack), muse_results(mia_min_k=muse_attack))

    assert load(tmp_path / "TOFU_EVAL.json")["mia_loss"] == tofu_attack
    assert load(tmp_path / "MUSE_EVAL.json")["mia_min_k"] == muse_attack
    assert set(muse_attack) == {"forget", "holdout", "auc", "agg_value"}
    assert "mia_min_k" not in load(tmp_path / "MUSE_SUMMARY.json")  # a pre-compute of privleak in OU


def test_strings_in_per_example_rows_are_kept(tmp_path):
    write_ou_files(tmp_path, tofu_results(), muse_results())

    row = load(tmp_path / "TOFU_EVAL.json")["forget_Q_A_ROUGE"]["value_by_index"]["1"]
    assert row == {"rouge1_recall": 0.75, "rougeL_f1": 0.75, "rougeL_recall": 0.75,
                   "input": "Q1?", "ground_truth": "A1", "generation": "42"}  # "42" stays a string


def test_numpy_values_and_integer_indices_are_written_as_json(tmp_path):
    entry = {"agg_value": np.float32(0.5),
             "value_by_index": {0: {"prob": np.array([0.25, 0.75]), "n": np.int64(3), "ok": np.bool_(True)}}}
    write_ou_files(tmp_path, tofu_results(wf_Q_A_Prob=entry), {})

    assert load(tmp_path / "TOFU_EVAL.json")["wf_Q_A_Prob"] == {
        "agg_value": 0.5, "value_by_index": {"0": {"prob": [0.25, 0.75], "n": 3, "ok": True}}}


def test_an_empty_benchmark_gets_no_files(tmp_path):
    written = write_ou_files(tmp_path, {}, muse_results())

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    assert not any(p.name.startswith("TOFU") for p in tmp_path.iterdir())
    assert write_ou_files(tmp_path / "nothing", None, {}) == []
    assert not (tmp_path / "nothing").exists()


def test_writing_leaves_no_temporary_files(tmp_path):
    write_ou_files(tmp_path, tofu_results(), muse_results())
    write_ou_files(tmp_path, tofu_results(privleak=MetricResult(1.0)), muse_results())  # overwrite

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{b}_{kind}" for b in ("TOFU", "MUSE") for kind in ("EVAL.json", "SUMMARY.json", "SUMMARY.notes.json"))
    assert load(tmp_path / "TOFU_SUMMARY.json")["privleak"] == 1.0


def test_a_failed_replace_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    write_ou_files(tmp_path, tofu_results(), {})
    before = (tmp_path / "TOFU_EVAL.json").read_text()

    def fail(source, target):
        raise OSError("disk full")
    monkeypatch.setattr(ou_files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_ou_files(tmp_path, tofu_results(privleak=MetricResult(1.0)), {})

    assert (tmp_path / "TOFU_EVAL.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "TOFU_EVAL.json", "TOFU_SUMMARY.json", "TOFU_SUMMARY.notes.json"]


def test_a_value_without_json_form_writes_nothing(tmp_path):
    muse = muse_results(privleak={"agg_value": 1.0, "value_by_index": {"0": {"x": object()}}})
    with pytest.raises(TypeError, match=r"MUSE result 'privleak'"):
        write_ou_files(tmp_path, tofu_results(), muse)
    assert list(tmp_path.iterdir()) == []


def test_read_ou_summary_names_the_file_on_bad_content(tmp_path):
    cases = {"broken.json": '{"privleak": ', "nan.json": '{"privleak": NaN}',
             "list.json": "[1, 2]", "text.json": '{"privleak": "high"}'}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=name):
            read_ou_summary(tmp_path / name)
    with pytest.raises(DataError, match="absent.json"):
        read_ou_summary(tmp_path / "absent.json")


def test_a_merged_evaluation_point_is_split_into_the_two_families(tmp_path):
    """report.write_results: the package's merged results go to open-unlearning's two files
    under its names (the QA-side attacks lose their tofu_ prefix), next to the merged file."""
    from ngdiff_ds.eval.report import write_results

    attack = {"forget": {"agg_value": 1.0, "value_by_index": {"0": {"score": 1.0}}},
              "holdout": {"agg_value": 2.0, "value_by_index": {"0": {"score": 2.0}}},
              "auc": 0.75, "agg_value": 0.75}
    results = {"forget_Q_A_Prob": MetricResult(0.5, {"0": {"prob": 0.5, "avg_loss": 0.69}}),
               "model_utility_partial": MetricResult(0.4),
               "tofu_mia_min_k": attack, "tofu_privleak": MetricResult(-20.0),
               "mia_min_k": {**attack, "auc": 0.9, "agg_value": 0.9},
               "privleak": MetricResult(float("nan")),
               "forget_verbmem_ROUGE": MetricResult(0.3)}
    summary = write_results(results, tmp_path, "step10", {"rouge_stemming": "muse"})
    assert summary["tofu_privleak"] == -20.0 and math.isnan(summary["privleak"])
    merged = json.loads((tmp_path / "step10_results.json").read_text())
    assert merged["eval_settings"] == {"rouge_stemming": "muse"}
    assert merged["tofu_mia_min_k"]["auc"] == 0.75  # the attack's layout is kept whole
    assert json.loads((tmp_path / "step10_summary.json").read_text())["privleak"] is None
    tofu = json.loads((tmp_path / "step10" / "TOFU_EVAL.json").read_text())
    assert set(tofu) == {"forget_Q_A_Prob", "model_utility_partial", "mia_min_k", "privleak"}
    assert tofu["mia_min_k"]["auc"] == 0.75 and tofu["privleak"]["agg_value"] == -20.0
    tofu_summary = json.loads((tmp_path / "step10" / "TOFU_SUMMARY.json").read_text())
    assert tofu_summary["privleak"] == -20.0 and tofu_summary["model_utility"] is None
    notes = json.loads((tmp_path / "step10" / "TOFU_SUMMARY.notes.json").read_text())
    assert "model_utility_partial" in notes["model_utility"]
    muse = json.loads((tmp_path / "step10" / "MUSE_EVAL.json").read_text())
    assert set(muse) == {"mia_min_k", "privleak", "forget_verbmem_ROUGE"}
    assert muse["mia_min_k"]["auc"] == 0.9 and muse["privleak"]["agg_value"] is None
    muse_notes = json.loads((tmp_path / "step10" / "MUSE_SUMMARY.notes.json").read_text())
    assert "muse" in muse_notes["forget_verbmem_ROUGE"] and "privleak" in muse_notes
    def refuse(token):
        raise AssertionError(f"bare {token} in a results file")
    for path in tmp_path.rglob("*.json"):
        json.loads(path.read_text(), parse_constant=refuse)  # strict JSON: no NaN / Infinity
