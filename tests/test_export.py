"""launch/export.py: a checkpoint becomes an HF directory offline, in one plain process.

A 4-step run on 2 ranks checkpoints at steps 2 and 4 and exports its model live; the export of
its final checkpoint (named directly, and as the checkpoints directory's ``latest``), made
with plain python (no launcher, no process group, no world size given), must equal that live
export bit for bit. Incomplete checkpoints and missing paths exit 2 naming the path.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PYTHON, REPO, cpu_env, run_deepspeed

CONFIG = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}


def _export(*args):
    return subprocess.run([PYTHON, "launch/export.py", *map(str, args)], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tiny_assets, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("export_run")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(CONFIG))
    out = tmp_path / "out"
    result = run_deepspeed(2, "launch/unlearn.py", [
        "--deepspeed", str(config), "--model", tiny_assets["model"], "--data", tiny_assets["data"],
        "--output-dir", str(out), "--max-steps", "4", "--save-every", "2", "--no-eval",
        "--no-adaptive-lr", "--max-length", "64"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step000004"
    return out


def _assert_same_model(exported, live):
    weights = load_file(str(exported / "model.safetensors"))
    expected = load_file(str(live / "model.safetensors"))
    assert weights.keys() == expected.keys()
    for name in expected:
        assert weights[name].dtype == expected[name].dtype, name
        assert torch.equal(weights[name], expected[name]), name
    # config, generation config, tokenizer and the safetensors file itself: byte for byte
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in live.iterdir())
    for path in live.iterdir():
        assert (exported / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.slow
def test_final_checkpoint_exports_to_the_live_model_bit_for_bit(run_dir, tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    live = run_dir / "model"
    start = load_file(f"{tiny_assets['model']}/model.safetensors")
    trained = load_file(str(live / "model.safetensors"))
    assert any(not torch.equal(start[k], trained[k]) for k in trained), "the run changed nothing"

    step = run_dir / "checkpoints" / "step000004"
    result = _export(step, tmp_path / "from_step")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"exported {step}" in result.stdout
    _assert_same_model(tmp_path / "from_step", live)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "from_step")
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # tied again
    assert torch.equal(model.model.norm.weight, trained["model.norm.weight"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "from_step")
    assert tokenizer("a test").input_ids

    result = _export(run_dir / "checkpoints", tmp_path / "from_latest")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"exported {step}" in result.stdout
    _assert_same_model(tmp_path / "from_latest", live)


@pytest.mark.slow
def test_an_incomplete_checkpoint_is_refused(run_dir, tmp_path):
    torn = tmp_path / "torn"
    shutil.copytree(run_dir / "checkpoints" / "step000002", torn)
    (torn / "ngdiff_checkpoint.json").unlink()
    result = _export(torn, tmp_path / "exported")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"error: checkpoint {torn} is not a complete checkpoint" in result.stderr
    assert not (tmp_path / "exported").exists()


def test_a_missing_path_is_refused(tmp_path):
    result = _export(tmp_path / "no_such_checkpoint", tmp_path / "exported")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: checkpoint {tmp_path / 'no_such_checkpoint'} does not exist"
    assert not (tmp_path / "exported").exists()
