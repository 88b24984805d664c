"""Resuming a checkpoint on another number of ranks (a requeued job that got fewer or more
GPUs), through DeepSpeed's universal checkpoint, keeping the global batch.

The reference is the uninterrupted run: after resuming at step 4 the final weights match it
to float tolerance (the same 2e-5 as 1 vs 2 ranks in tests/test_distributed.py), each train
step is logged once, and the adaptive rate (a fit after step 1) carries over. The method is
``ngdiff_npo``: NPO's reference log-probabilities travel in the checkpoint's client state.
"""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from tests.conftest import run_deepspeed

pytestmark = pytest.mark.slow  # multi-rank DeepSpeed launches

STEPS = 8
WEIGHT_ATOL = 2e-5
ADAMW = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "eps": 1e-6}}


def _args(tmp_path, tiny_assets, out, config=None, *extra):
    path = tmp_path / f"ds_{out.name}.json"
    path.write_text(json.dumps(config or {"train_micro_batch_size_per_gpu": 2,
                                          "zero_optimization": {"stage": 3}, "optimizer": ADAMW}))
    return ["--deepspeed", str(path), "--model", tiny_assets["model"], "--data",
            tiny_assets["data"], "--output-dir", str(out), "--max-steps", str(STEPS),
            "--max-length", "64", "--save-every", "4", "--resume", "auto", "--no-eval",
            "--method", "ngdiff_npo", *extra]


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _back_to_step_4(run, copy):
    """``copy`` = ``run`` as if it had been killed right after its step-4 checkpoint."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step000008")
    (copy / "checkpoints" / "latest").write_text("step000004")
    shutil.rmtree(copy / "model")


def _assert_continues(resumed, reference):
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(STEPS))
    weights = load_file(str(resumed / "model" / "model.safetensors"))
    expected = load_file(str(reference / "model" / "model.safetensors"))
    worst = max((weights[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= WEIGHT_ATOL, worst
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["global_batch_per_task"] == 4
    # the adaptive rate's state (fits before the checkpoint, refits after) carried over: the
    # same fits and rate as the uninterrupted run
    expected_rate = json.loads((reference / "summary.json").read_text())["adaptive_lr"]
    assert summary["adaptive_lr"]["num_fits"] == expected_rate["num_fits"] >= 1
    assert summary["adaptive_lr"]["lr"] == pytest.approx(expected_rate["lr"], rel=1e-4)


def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path, tiny_assets):
    whole = tmp_path / "two"
    _ok(run_deepspeed(2, "launch/unlearn.py", _args(tmp_path, tiny_assets, whole)))
    resumed = tmp_path / "one"
    _back_to_step_4(whole, resumed)
    result = _ok(run_deepspeed(1, "launch/unlearn.py", _args(tmp_path, tiny_assets, resumed)))
    assert "written by 2 rank(s), this job has 1: global batch 4 kept as 2 micro-batch(es)" \
        in result.stdout
    _assert_continues(resumed, whole)
    # a micro-batch that cannot make the checkpoint's global batch is refused, naming sizes
    free_micro = {"zero_optimization": {"stage": 3}, "optimizer": ADAMW}
    refused = tmp_path / "refused"
    _back_to_step_4(whole, refused)
    result = run_deepspeed(1, "launch/unlearn.py",
                           _args(tmp_path, tiny_assets, refused, free_micro, "--micro-batch-size", "3"))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "global batch is 4" in result.stderr and "micro-batch sizes that work" in result.stderr


def test_one_rank_checkpoint_resumes_on_two_ranks(tmp_path, tiny_assets):
    whole = tmp_path / "one"
    _ok(run_deepspeed(1, "launch/unlearn.py",
                      _args(tmp_path, tiny_assets, whole, None, "--grad-accum-steps", "2")))
    resumed = tmp_path / "two"
    _back_to_step_4(whole, resumed)
    result = _ok(run_deepspeed(2, "launch/unlearn.py", _args(tmp_path, tiny_assets, resumed)))
    assert "1 rank(s) -> 2, through DeepSpeed's universal checkpoint" in result.stdout
    _assert_continues(resumed, whole)
