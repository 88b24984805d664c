"""A new method plugs in without a library edit: a forgetting loss with one option, defined and
registered in tests/plugin_losses.py, runs through the real CLI on 2 ranks.

The reference is the built-in gradient ascent on the same batches: at the same weights the
scaled loss and its gradient norm are exactly ``scale`` times GA's (step 0), and under NGDiff's
normalisation the weights after the steps agree with GA's to float tolerance.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from safetensors.torch import load_file

from tests.conftest import PYTHON, REPO, run_deepspeed, single_rank_env

PLUGIN = "tests/plugin_losses.py"
SCALE = 0.25
CONFIG = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}


def _common(tmp_path, tiny_assets, out):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(CONFIG))
    return ["--deepspeed", str(config), "--model", tiny_assets["model"], "--data",
            tiny_assets["data"], "--output-dir", str(tmp_path / out), "--max-steps", "2",
            "--no-eval", "--no-adaptive-lr", "--max-length", "64"]


def _train_rows(directory):
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


@pytest.mark.slow
def test_plugin_loss_with_an_option_runs_through_the_cli_on_two_ranks(tmp_path, tiny_assets):
    scaled = run_deepspeed(2, "launch/unlearn.py", _common(tmp_path, tiny_assets, "scaled") + [
        "--plugin", PLUGIN, "--forget-loss", "scaled_ga", "--forget-loss-option", f"scale={SCALE}"])
    assert scaled.returncode == 0, scaled.stdout[-3000:] + scaled.stderr[-3000:]
    plain = run_deepspeed(2, "launch/unlearn.py", _common(tmp_path, tiny_assets, "ga"))
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]

    scaled_rows, plain_rows = _train_rows(tmp_path / "scaled"), _train_rows(tmp_path / "ga")
    assert len(scaled_rows) == len(plain_rows) == 2
    first, reference = scaled_rows[0], plain_rows[0]
    assert first["forget_loss"] == pytest.approx(SCALE * reference["forget_loss"], rel=1e-6)
    assert first["forget_grad_norm"] == pytest.approx(SCALE * reference["forget_grad_norm"], rel=1e-5)
    assert first["retain_loss"] == pytest.approx(reference["retain_loss"], rel=1e-6)
    # NGDiff normalises each task gradient: the scale cancels in the direction
    scaled_weights = load_file(str(tmp_path / "scaled" / "model" / "model.safetensors"))
    plain_weights = load_file(str(tmp_path / "ga" / "model" / "model.safetensors"))
    worst = max((scaled_weights[k] - plain_weights[k]).abs().max().item() for k in plain_weights)
    assert worst < 1e-5, worst


def _run_single_rank(tmp_path, tiny_assets, extra):
    command = [PYTHON, "launch/unlearn.py", *_common(tmp_path, tiny_assets, "out"), *extra]
    return subprocess.run(command, cwd=REPO, env=single_rank_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("extra,needles", [
    (["--forget-loss", "scaled_ga", "--forget-loss-option", "nope=1"], ["nope", "scale"]),
    (["--forget-loss", "scaled_ga", "--forget-loss-option", "scale=abc"], ["scale=abc", "float"]),
    (["--forget-loss", "scaled_ga", "--forget-loss-option", "scale=-1"], ["scale must be positive"]),
    (["--forget-loss", "no_such_loss"], ["no_such_loss", "scaled_ga", "ga"]),
])
def test_bad_method_settings_are_refused_with_the_flag(tmp_path, tiny_assets, extra, needles):
    result = _run_single_rank(tmp_path, tiny_assets, ["--plugin", PLUGIN, *extra])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr[-2000:])


def test_a_bug_in_a_method_is_a_traceback_not_bad_input(tmp_path, tiny_assets):
    result = _run_single_rank(tmp_path, tiny_assets, ["--plugin", PLUGIN, "--forget-loss", "broken"])
    assert result.returncode not in (0, 2), result.stderr[-2000:]
    assert "Traceback" in result.stderr and "a bug in a loss function" in result.stderr
