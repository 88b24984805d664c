"""The memory levers' own pieces: the LoRA merge against peft's, the settings' checks, and a
LoRA run through the CLI whose exports (live, from a checkpoint, the adapter alone) agree.

The LoRA step itself is checked against the single-process reference in test_distributed.py.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.memory import MemorySettings, adapter_state_dict, merged_lora_state_dict
from tests.conftest import PYTHON, REPO, single_rank_env


def _tiny_peft_model(rank=4, alpha=12):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1))
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # B starts at zero, which would make any merge look right
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_()
    return model


def test_merge_equals_peft_merge_and_unload():
    model = _tiny_peft_model(rank=4, alpha=12)
    base_q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    ours = merged_lora_state_dict(model.state_dict(), scale=12 / 4)
    reference = model.merge_and_unload().state_dict()  # merges in place
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], base_q)


def test_adapter_state_dict_has_peft_file_keys():
    from peft import get_peft_model_state_dict

    model = _tiny_peft_model()
    assert adapter_state_dict(model.state_dict()).keys() == get_peft_model_state_dict(model).keys()


@pytest.mark.parametrize("settings,flag", [
    (dict(lora_rank=-1), "--lora-rank"),
    (dict(lora_rank=4, lora_alpha=0.0), "--lora-alpha"),
    (dict(lora_rank=4, lora_targets=" , "), "--lora-targets"),
    (dict(save_adapter=True), "--save-adapter"),
])
def test_bad_settings_name_the_flag(settings, flag):
    with pytest.raises(ConfigError, match=flag):
        MemorySettings(**settings)


def _unlearn(tmp_path, tiny_assets, *extra):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2,
                                  "zero_optimization": {"stage": 3},
                                  "optimizer": {"type": "AdamW",
                                                "params": {"lr": 1e-2, "torch_adam": True}}}))
    command = [PYTHON, "launch/unlearn.py", "--deepspeed", str(config), "--model",
               tiny_assets["model"], "--data", tiny_assets["data"], "--output-dir",
               str(tmp_path / "out"), "--max-length", "64",
               "--no-eval", *extra]
    return subprocess.run(command, cwd=REPO, env=single_rank_env(), capture_output=True,
                          text=True, timeout=600)


def test_a_missing_lora_target_is_refused(tmp_path, tiny_assets):
    result = _unlearn(tmp_path, tiny_assets, "--max-steps", "1", "--lora-rank", "2",
                      "--lora-targets", "q_proj,c_attn")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--lora-targets: the model has no module named c_attn" in result.stderr


@pytest.mark.slow
def test_lora_run_exports_merged_weights_everywhere_alike(tmp_path, tiny_assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = _unlearn(tmp_path, tiny_assets, "--max-steps", "2", "--save-every", "2",
                      "--lora-rank", "4", "--save-adapter")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    live = load_file(str(out / "model" / "model.safetensors"))
    assert not any("lora" in name for name in live)  # a plain HF model
    initial = AutoModelForCausalLM.from_pretrained(tiny_assets["model"]).state_dict()
    assert not torch.equal(live["model.layers.0.self_attn.q_proj.weight"],
                           initial["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(live["model.layers.0.mlp.up_proj.weight"],  # not a target: frozen
                       initial["model.layers.0.mlp.up_proj.weight"])
    # the adapter alone, loaded by peft onto the original model and merged by peft
    base = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    merged = PeftModel.from_pretrained(base, str(out / "model" / "adapter")).merge_and_unload()
    for name, tensor in merged.state_dict().items():
        if name in live:
            torch.testing.assert_close(live[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    # the offline export of the final checkpoint: the same merged model
    export = subprocess.run([PYTHON, "launch/export.py", str(out / "checkpoints"),
                             str(tmp_path / "exported")], cwd=REPO, env=single_rank_env(),
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert exported.keys() == live.keys()
    for name in live:
        torch.testing.assert_close(exported[name], live[name], rtol=0, atol=1e-6, msg=name)
    # resuming the LoRA checkpoint without the adapters is another run: refused before loading
    resumed = _unlearn(tmp_path, tiny_assets, "--max-steps", "3", "--resume", "auto")
    assert resumed.returncode == 2, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "belongs to another run: lora is None now but was {'rank': 4" in resumed.stderr
