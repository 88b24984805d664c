"""Bad input to launch/unlearn.py: a one-line message naming the problem, exit code 2, no
traceback, and no output directory left behind.

Each case runs the real script as a 1-rank job (the environment a launcher would export), so
the checks that need the process group (world size vs batch sizes) run too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, single_rank_env

GOOD_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
    "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
}


def run_unlearn(tmp_path: Path, model: str, data: str, config: dict | None = None,
                extra: list[str] = ()) -> subprocess.CompletedProcess:
    config_path = tmp_path / "ds.json"
    config_path.write_text(json.dumps(GOOD_CONFIG if config is None else config))
    command = [PYTHON, "launch/unlearn.py", "--deepspeed", str(config_path), "--model", model,
               "--data", data, "--output-dir", str(tmp_path / "out"), "--max-steps", "1", *extra]
    return subprocess.run(command, cwd=REPO, env=single_rank_env(), capture_output=True, text=True,
                          timeout=300)


def assert_refused(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr
    for needle in needles:
        assert needle in message, (needle, message[-2000:])


def write_split(directory: Path, name: str, records) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(records))
    return path


def qa(i):
    return {"question": f"Who wrote book {i}?", "answer": f"Author {i} wrote it."}


def test_missing_split_names_directory_and_available_splits(tmp_path, tiny_assets):
    data = tmp_path / "data"
    write_split(data, "retain90", [qa(i) for i in range(4)])
    result = run_unlearn(tmp_path, tiny_assets["model"], str(data))
    assert_refused(result, "forget10", str(data), "retain90")
    assert not (tmp_path / "out").exists()


def test_record_missing_a_field_names_file_record_and_field(tmp_path, tiny_assets):
    data = tmp_path / "data"
    records = [qa(i) for i in range(4)]
    del records[2]["answer"]
    write_split(data, "forget10", records)
    write_split(data, "retain90", [qa(i) for i in range(4)])
    result = run_unlearn(tmp_path, tiny_assets["model"], str(data))
    assert_refused(result, "forget10.json", "record 2", "answer")


def test_malformed_json_names_file(tmp_path, tiny_assets):
    data = tmp_path / "data"
    write_split(data, "retain90", [qa(i) for i in range(4)])
    (data / "forget10.json").write_text('[{"question": "q", "answer": ')
    result = run_unlearn(tmp_path, tiny_assets["model"], str(data))
    assert_refused(result, "forget10.json")


def test_empty_forget_split(tmp_path, tiny_assets):
    data = tmp_path / "data"
    write_split(data, "forget10", [])
    write_split(data, "retain90", [qa(i) for i in range(4)])
    result = run_unlearn(tmp_path, tiny_assets["model"], str(data))
    assert_refused(result, "forget10", "no records")


def test_model_path_that_does_not_exist(tmp_path, tiny_assets):
    result = run_unlearn(tmp_path, str(tmp_path / "no_such_model"), tiny_assets["data"])
    assert_refused(result, "no_such_model", "does not exist")


def test_question_longer_than_max_length(tmp_path, tiny_assets):
    result = run_unlearn(tmp_path, tiny_assets["model"], tiny_assets["data"], extra=["--max-length", "4"])
    assert_refused(result, "forget10", "record 0", "no room for the answer")


@pytest.mark.parametrize("change,needle", [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage is 2"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"train_micro_batch_size_per_gpu": "auto"}, "\"auto\""),
    ({"train_batch_size": 8}, "train_batch_size is 8"),
])
def test_refused_deepspeed_settings(tmp_path, tiny_assets, change, needle):
    result = run_unlearn(tmp_path, tiny_assets["model"], tiny_assets["data"],
                         config={**GOOD_CONFIG, **change})
    assert_refused(result, needle, "ds.json")


def test_batch_size_disagreeing_with_command_line(tmp_path, tiny_assets):
    result = run_unlearn(tmp_path, tiny_assets["model"], tiny_assets["data"],
                         extra=["--micro-batch-size", "3"])
    assert_refused(result, "train_micro_batch_size_per_gpu is 2", "--micro-batch-size 3")


def test_data_without_model_is_refused(tmp_path, tiny_assets):
    command = [PYTHON, "launch/unlearn.py", "--deepspeed", "ds_configs/zero3.json",
               "--data", tiny_assets["data"], "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, env=single_rank_env(), capture_output=True,
                            text=True, timeout=300)
    assert_refused(result, "--model and --data")


@pytest.mark.parametrize("flags,needle", [
    (["--lr", "0"], "--lr must be positive"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--method", "npo2"], "--method must be one of ga, gdiff, gdiff_kl, npo"),
])
def test_bad_numeric_flags(tmp_path, tiny_assets, flags, needle):
    result = run_unlearn(tmp_path, tiny_assets["model"], tiny_assets["data"], extra=flags)
    assert_refused(result, needle)


def test_missing_reference_results_file(tmp_path, tiny_assets):
    missing = tmp_path / "no_such_results.json"
    result = run_unlearn(tmp_path, tiny_assets["model"], tiny_assets["data"],
                         extra=["--retain-results", str(missing)])
    assert_refused(result, "no_such_results.json")


def test_malformed_muse_split_is_refused_not_skipped(tmp_path, tiny_assets):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_assets["data"], data)
    (data / "forget10_verbmem.json").write_text(json.dumps([{"prompt": "Once upon"}]))
    result = run_unlearn(tmp_path, tiny_assets["model"], str(data))
    assert_refused(result, "forget10_verbmem.json", "record 0", "'gt'")


def test_missing_part_of_a_joined_split(tmp_path, tiny_assets):
    result = run_unlearn(tmp_path, tiny_assets["model"], tiny_assets["data"],
                         extra=["--forget-split", "forget10+forget10_nosuch",
                                "--retain-split", "retain90"])
    assert_refused(result, "forget10_nosuch", "available splits")


@pytest.mark.parametrize("flags,needle", [
    (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
    (["--verbmem-max-new-tokens", "0"], "--verbmem-max-new-tokens must be at least 1"),
])
def test_evaluate_script_refuses_bad_numbers(tmp_path, tiny_assets, flags, needle):
    command = [PYTHON, "launch/evaluate.py", "--deepspeed", "ds_configs/zero3.json",
               "--model", tiny_assets["model"], "--data", tiny_assets["data"],
               "--output-dir", str(tmp_path / "out"), *flags]
    result = subprocess.run(command, cwd=REPO, env=single_rank_env(), capture_output=True,
                            text=True, timeout=300)
    assert_refused(result, needle)


def test_evaluate_script_refuses_a_missing_retain_model(tmp_path, tiny_assets):
    command = [PYTHON, "launch/evaluate.py", "--deepspeed", "ds_configs/zero3.json",
               "--model", tiny_assets["model"], "--data", tiny_assets["data"],
               "--retain-model", str(tmp_path / "no_such_retain_model"),
               "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, env=single_rank_env(), capture_output=True,
                            text=True, timeout=300)
    assert_refused(result, "no_such_retain_model")


def test_output_dir_that_is_a_file_is_refused(tmp_path, tiny_assets):
    (tmp_path / "out").write_text("not a directory")
    result = run_unlearn(tmp_path, tiny_assets["model"], tiny_assets["data"])
    assert_refused(result, "--output-dir", "exists and is not a directory")
    nested = [PYTHON, "launch/unlearn.py", "--deepspeed", str(tmp_path / "ds.json"), "--model",
              tiny_assets["model"], "--data", tiny_assets["data"], "--output-dir",
              str(tmp_path / "out" / "run")]
    result = subprocess.run(nested, cwd=REPO, env=single_rank_env(), capture_output=True,
                            text=True, timeout=300)
    assert_refused(result, "is a file, not a directory")


@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
def test_non_finite_number_in_the_json_is_refused(tmp_path, tiny_assets, literal):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(GOOD_CONFIG).replace('"lr": 0.1', f'"lr": {literal}'))
    command = [PYTHON, "launch/unlearn.py", "--deepspeed", str(config), "--model",
               tiny_assets["model"], "--data", tiny_assets["data"], "--output-dir",
               str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, env=single_rank_env(), capture_output=True,
                            text=True, timeout=300)
    assert_refused(result, str(config), literal)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--resume", "no_such_checkpoint"], "no such checkpoint"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--keep-last", "0"], "--keep-last must be at least 1"),
])
def test_bad_checkpoint_flags(tmp_path, tiny_assets, flags, needle):
    result = run_unlearn(tmp_path, tiny_assets["model"], tiny_assets["data"], extra=flags)
    assert_refused(result, needle)


def test_forget_examples_in_the_retain_split_are_counted(tmp_path, tiny_assets):
    data = tmp_path / "data"
    shutil.copytree(tiny_assets["data"], data)
    forget = json.loads((data / "forget10.json").read_text())
    retain = json.loads((data / "retain90.json").read_text())
    (data / "retain90.json").write_text(json.dumps(retain + forget[:3]))
    result = run_unlearn(tmp_path, tiny_assets["model"], str(data), extra=["--no-eval"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"warning: 3 of the {len(forget)} forget examples also appear in the retain" in result.stdout
