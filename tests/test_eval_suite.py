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


@pytest.fixture
def muse_data(tmp_path):
    data = tmp_path / "data"
    for name, records in (("forget10", QA), ("retain90", QA * 3), ("world_facts", QA),
                          ("forget10_text", TEXT), ("forget10_verbmem", VERBMEM),
                          ("holdout_text", TEXT)):
        write(data, name, records)
    return data


def test_every_set_of_a_complete_data_directory(muse_data):
    notes = []
    sets = load_eval_sets(str(muse_data), SplitNames("forget10", "retain90", retain_size=4),
                          note=notes.append)
    assert sorted(sets) == ["forget", "forget_text", "holdout_text", "retain", "verbmem", "wf"]
    assert len(sets["retain"]) == 4 and sets["verbmem"] == VERBMEM and notes == []


def test_absent_optional_sets_are_skipped_with_a_note(muse_data):
    (muse_data / "holdout_text.json").unlink()
    (muse_data / "world_facts.json").unlink()
    notes = []
    sets = load_eval_sets(str(muse_data), SplitNames("forget10", "retain90"), note=notes.append)
    # without held-out texts there is no membership test, so the forget texts go too
    assert sorted(sets) == ["forget", "retain", "verbmem"]
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
    assert sorted(sets) == ["forget", "retain", "wf"]
    notes = []
    single = muse_data / "forget10.json"
    sets = load_eval_sets(str(single), SplitNames("forget10", "retain90"), note=notes.append)
    assert sorted(sets) == ["forget", "retain"] and "single file" in notes[0]


def test_a_text_forget_split_gets_muse_metrics_only(muse_data):
    notes = []
    sets = load_eval_sets(str(muse_data), SplitNames("forget10_text", "retain90",
                                                     verbmem="forget10_verbmem"),
                          note=notes.append)
    assert sorted(sets) == ["forget_text", "holdout_text", "verbmem"]
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


def test_reference_from_tofu_muse_and_mixed_files(tmp_path):
    ratios = {"forget_truth_ratio": {"agg_value": 0.7, "value_by_index": {
        "1": {"score": 0.5}, "0": {"score": 0.25}, "10": {"score": None}, "2": {"score": 1.0}}}}
    auc = {"mia_min_k": {"agg_value": 0.55}}
    tofu_only = Reference.from_file(results_file(tmp_path, ratios))
    assert tofu_only.forget_truth_ratios[:3] == [0.25, 0.5, 1.0]  # numeric index order
    assert math.isnan(tofu_only.forget_truth_ratios[3]) and tofu_only.mia_auc is None
    muse_only = Reference.from_file(results_file(tmp_path, auc))
    assert muse_only.forget_truth_ratios is None and muse_only.mia_auc == 0.55
    both = Reference.from_file(results_file(tmp_path, {**ratios, **auc}))
    assert both.mia_auc == 0.55 and len(both.forget_truth_ratios) == 4


@pytest.mark.parametrize("payload,needle", [
    ({"forget_Q_A_Prob": {"agg_value": 0.5}}, "neither forget_truth_ratio nor mia_min_k"),
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
