"""Which evaluation sets a run gets from its data, the retain-only reference read from results
files, and the split-name helpers of the launch scripts."""

from __future__ import annotations

import json
import math

import pytest

from ngdiff_ds.data.records import load_training_records
from ngdiff_ds.errors import ConfigError, DataError, SplitNotFound
from ngdiff_ds.eval.suite import Reference, SplitNames, load_eval_sets
from ngdiff_ds.unlearn import tofu_retain_split

QA = [{"question": f"q{i}?", "answer": f"a{i}."} for i in range(3)]
TEXT = [{"text": f"passage {i}."} for i in range(2)]
VERBMEM = [{"prompt": "once", "gt": "upon a time"}]


def write(directory, name, records):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(records))


RETAIN = [{"question": f"r{i}?", "answer": f"b{i}."} for i in range(9)]
HOLDOUT = [{"question": f"h{i}?", "answer": f"c{i}."} for i in range(2)]


@pytest.fixture
def muse_data(tmp_path):
    data = tmp_path / "data"
    for name, records in (("forget10", QA), ("retain90", RETAIN), ("world_facts", QA),
                          ("real_authors", QA[:2]), ("holdout", HOLDOUT),
                          ("retain_perturbed", RETAIN[:5]),
                          ("forget10_text", TEXT), ("forget10_verbmem", VERBMEM),
                          ("forget10_knowmem", QA[:1]), ("retain90_knowmem", RETAIN[:2]),
                          ("knowmem_icl", HOLDOUT), ("holdout_text", TEXT)):
        write(data, name, records)
    return data


def test_every_set_of_a_complete_data_directory(muse_data):
    notes = []
    sets = load_eval_sets(str(muse_data), SplitNames("forget10", "retain90", retain_size=4),
                          note=notes.append)
    assert sorted(sets) == ["forget", "forget_knowmem", "forget_text", "holdout", "holdout_text",
                            "knowmem_icl", "ra", "retain", "retain_knowmem", "verbmem", "wf"]
    assert sets["knowmem_icl"] == HOLDOUT and sets["retain_knowmem"] == RETAIN[:2]
    # TOFU's retain_perturbed, not the first --eval-retain-size pairs
    assert sets["retain"] == RETAIN[:5] and sets["verbmem"] == VERBMEM and notes == []
    assert sets["ra"] == QA[:2] and sets["holdout"] == HOLDOUT


def test_retain_eval_split_absent_or_not_in_the_retain_split(muse_data):
    (muse_data / "retain_perturbed.json").unlink()
    notes = []
    sets = load_eval_sets(str(muse_data), SplitNames("forget10", "retain90", retain_size=4),
                          note=notes.append)
    assert sets["retain"] == RETAIN[:4] and any("first 4" in n for n in notes)
    write(muse_data, "retain_perturbed", QA)  # forget pairs: not a retain set
    notes = []
    sets = load_eval_sets(str(muse_data), SplitNames("forget10", "retain90", retain_size=4),
                          note=notes.append)
    assert sets["retain"] == RETAIN[:4] and any("not in 'retain90'" in n for n in notes)


def test_absent_optional_sets_are_skipped_with_a_note(muse_data):
    (muse_data / "holdout_text.json").unlink()
    (muse_data / "world_facts.json").unlink()
    notes = []
    sets = load_eval_sets(str(muse_data), SplitNames("forget10", "retain90"), note=notes.append)
    # without held-out texts there is no membership test, so the forget texts go too
    assert sorted(sets) == ["forget", "forget_knowmem", "holdout", "knowmem_icl", "ra", "retain",
                            "retain_knowmem", "verbmem"]
    assert any("holdout_text" in n and "PrivLeak" in n for n in notes)
    assert any("world_facts" in n for n in notes)


def test_present_but_malformed_or_explicitly_named_sets_are_errors(muse_data):
    write(muse_data, "forget10_verbmem", [{"prompt": "once"}])
    with pytest.raises(DataError, match="'gt'"):
        load_eval_sets(str(muse_data), SplitNames("forget10", "retain90"))
    write(muse_data, "forget10_verbmem", VERBMEM)
    with pytest.raises(SplitNotFound, match="no_such_verbmem"):
        load_eval_sets(str(muse_data), SplitNames("forget10", "retain90", verbmem="no_such_verbmem"))


def test_no_muse_and_single_file_data(muse_data):
    sets = load_eval_sets(str(muse_data), SplitNames("forget10", "retain90", muse=False))
    assert sorted(sets) == ["forget", "holdout", "ra", "retain", "wf"]
    notes = []
    single = muse_data / "forget10.json"
    sets = load_eval_sets(str(single), SplitNames("forget10", "retain90"), note=notes.append)
    assert sorted(sets) == ["forget", "retain"] and any("single file" in n for n in notes)


def test_a_text_forget_split_gets_muse_metrics_only(muse_data):
    notes = []
    sets = load_eval_sets(str(muse_data), SplitNames("forget10_text", "retain90",
                                                     verbmem="forget10_verbmem"),
                          note=notes.append)
    # no forget10_text_knowmem; the retain split's KnowMem QA is there
    assert sorted(sets) == ["forget_text", "holdout_text", "knowmem_icl", "retain_knowmem",
                            "verbmem"]
    assert sets["forget_text"] == TEXT and "no TOFU metrics" in notes[0]


def test_training_records_join_qa_and_text_splits(muse_data):
    records = load_training_records(str(muse_data), "forget10+forget10_text")
    assert records == QA + TEXT
    with pytest.raises(DataError, match="nor|not a text split"):
        load_training_records(str(muse_data), "forget10+forget10_verbmem")


@pytest.mark.parametrize("forget,retain", [("forget10", "retain90"), ("forget05", "retain95"),
                                           ("forget01_text", "retain99_text"),
                                           ("forget10+forget10_text", "retain90+retain90_text")])
def test_tofu_retain_split(forget, retain):
    assert tofu_retain_split(forget) == retain


def test_tofu_retain_split_refuses_other_names():
    with pytest.raises(ConfigError, match="raw:forget"):
        tofu_retain_split("raw:forget")


def results_file(tmp_path, payload):
    path = tmp_path / "ref_results.json"
    path.write_text(json.dumps(payload))
    return path


def mia_entry(auc, forget_nll, holdout_nll):
    """A membership attack in open-unlearning's layout (per-example statistic: the NLL)."""
    def side(values):
        return {"agg_value": sum(values) / len(values),
                "value_by_index": {str(i): {"score": v} for i, v in enumerate(values)}}
    return {"forget": side(forget_nll), "holdout": side(holdout_nll), "auc": auc, "agg_value": auc}


RATIOS = {"forget_truth_ratio": {"agg_value": 0.7, "value_by_index": {
    "1": {"score": 0.5}, "0": {"score": 0.25}, "10": {"score": None}, "2": {"score": 1.0}}}}


def test_reference_from_tofu_muse_and_merged_files(tmp_path):
    notes = []
    tofu_only = Reference.from_file(results_file(tmp_path, RATIOS), note=notes.append)
    assert tofu_only.forget_truth_ratios[:3] == [0.25, 0.5, 1.0]  # numeric index order
    assert math.isnan(tofu_only.forget_truth_ratios[3]) and tofu_only.mia_auc is None
    # a TOFU-only file's mia_min_k compares QA pairs: the reference of tofu_privleak only
    qa_auc = {"mia_min_k": mia_entry(0.55, [1.0, 2.0], [3.0])}
    tofu = Reference.from_file(results_file(tmp_path, {**RATIOS, **qa_auc}), note=notes.append)
    assert tofu.tofu_mia_auc == 0.55 and tofu.mia_auc is None
    assert any("QA" in n and "not of MUSE" in n for n in notes)
    # the same entry beside MUSE metrics (MUSE's file, or our merged file of before) is text
    text = Reference.from_file(results_file(tmp_path, {
        "forget_verbmem_ROUGE": {"agg_value": 0.3}, "mia_min_k": {"agg_value": 0.6}}))
    assert text.mia_auc == 0.6 and text.tofu_mia_auc is None
    # our merged file: both families under their own names, the NLLs from mia_loss
    merged = Reference.from_file(results_file(tmp_path, {
        **RATIOS, "mia_min_k": {"agg_value": 0.6}, "mia_loss": mia_entry(0.6, [1.5], [2.5, 3.5]),
        "tofu_mia_min_k": mia_entry(0.8, [1.0], [2.0]),
        "tofu_mia_loss": mia_entry(0.8, [0.5, 0.25], [4.0])}))
    assert (merged.mia_auc, merged.tofu_mia_auc) == (0.6, 0.8)
    assert merged.text_nll == {"forget": [1.5], "holdout": [2.5, 3.5]}
    assert merged.tofu_nll == {"forget": [0.5, 0.25], "holdout": [4.0]}


def test_open_unlearning_files_by_name_and_directory(tmp_path):
    (tmp_path / "TOFU_EVAL.json").write_text(json.dumps(
        {**RATIOS, "mia_min_k": mia_entry(0.9, [1.0], [2.0])}))
    (tmp_path / "MUSE_EVAL.json").write_text(json.dumps(
        {"mia_min_k": mia_entry(0.4, [1.0], [2.0])}))
    assert Reference.from_file(tmp_path / "TOFU_EVAL.json").tofu_mia_auc == 0.9
    assert Reference.from_file(tmp_path / "MUSE_EVAL.json").mia_auc == 0.4
    both = Reference.from_file(tmp_path)  # the directory open-unlearning writes
    assert (both.tofu_mia_auc, both.mia_auc, len(both.forget_truth_ratios)) == (0.9, 0.4, 4)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="neither TOFU_EVAL.json nor MUSE_EVAL.json"):
        Reference.from_file(tmp_path / "empty_dir")


def test_a_mia_min_k_of_unknown_sets_is_refused(tmp_path):
    with pytest.raises(DataError, match="cannot tell"):
        Reference.from_file(results_file(tmp_path, {"mia_min_k": {"agg_value": 0.55}}))


def test_drop_in_open_unlearning_reference_gives_hand_computed_quality_and_privleak(tmp_path):
    """An open-unlearning TOFU_EVAL.json written by hand, read as --retain-results reads it:
    forget quality and the QA-side PrivLeak equal a hand computation."""
    from ngdiff_ds.eval import metrics
    from ngdiff_ds.eval.membership import membership_attacks

    retain_ratios = [0.9, 0.8, 0.7, 0.6]
    (tmp_path / "TOFU_EVAL.json").write_text(json.dumps({
        "forget_truth_ratio": {"agg_value": 0.75, "value_by_index": {
            str(i): {"score": r} for i, r in enumerate(retain_ratios)}},
        "forget_Q_A_Prob": {"agg_value": 0.5, "value_by_index": {}},
        "mia_min_k": mia_entry(0.6, [2.0, 2.1], [2.2])}))
    reference = Reference.from_file(tmp_path)
    # unlearned model: ratios all below the reference's. KS statistic D = 1 (the two samples
    # do not overlap); the exact two-sided p-value for n = m = 4 with D = 1 is
    # 2 / C(8, 4) = 2 / 70 (only the two fully separated orderings reach D = 1)
    unlearned = [0.1, 0.2, 0.3, 0.4]
    quality = metrics.forget_quality(unlearned, reference.forget_truth_ratios)
    assert quality.agg_value == pytest.approx(2 / 70)
    # membership: two forget QA pairs, one held-out; Min-K% (k=0.4 -> one token) of the
    # answer tokens without the last (the eos): forget -0.1 and -0.3, held-out -2.0 -> both
    # forget pairs look more familiar: AUC 1. PrivLeak = (s - r) / r * 100, s = 1 - 1,
    # r = 1 - 0.6 -> -100
    def stats(values):
        return {"logprobs": values, "mu": [0.0] * len(values), "sigma": [1.0] * len(values)}
    attacks = membership_attacks(
        [stats([-0.1, -0.05, -9.0]), stats([-0.3, -0.2, -9.0])], [stats([-2.0, -1.0, -9.0])],
        ["a", "b"], ["c"], reference_auc=reference.tofu_mia_auc, drop_last_for_tokenwise=True)
    assert attacks["mia_min_k"]["auc"] == 1.0
    assert attacks["privleak"].agg_value == pytest.approx((0.0 - 0.4) / 0.4 * 100)


@pytest.mark.parametrize("payload,needle", [
    ({"forget_Q_A_Prob": {"agg_value": 0.5}}, "neither forget_truth_ratio nor mia_min_k"),
    ({"forget_Q_A_Prob": {"agg_value": 0.5}, "mia_min_k": [1]}, "results schema"),
    ({"forget_truth_ratio": {"agg_value": 0.7}}, "results schema"),
    ({"forget_truth_ratio": {"value_by_index": {"0": {"value": 1}}}}, "results schema"),
    ([1, 2], "JSON object"),
])
def test_reference_files_that_are_not_results_are_refused(tmp_path, payload, needle):
    with pytest.raises(DataError, match=needle):
        Reference.from_file(results_file(tmp_path, payload))


def test_reference_file_that_cannot_be_read(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        Reference.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        Reference.from_file(tmp_path / "bad.json")
