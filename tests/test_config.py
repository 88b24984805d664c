"""DeepSpeed JSON validation: each refused setting gives a message naming it."""

import json

import pytest

from ngdiff_ds.config import BatchLayout, engine_config, read_json, validate_ds_config
from ngdiff_ds.errors import ConfigError


def good_config(**overrides):
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    }
    config.update(overrides)
    return config


def test_good_config_gives_layout():
    layout = validate_ds_config(good_config(train_batch_size=16), "cfg.json", world_size=2)
    assert layout == BatchLayout(4, 2, 2)
    assert layout.global_batch_size == 16


@pytest.mark.parametrize("overrides,needle", [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage is 2"),
    ({"gradient_clipping": 1.0}, "gradient_clipping is 1.0"),
    ({"train_micro_batch_size_per_gpu": "auto"}, "train_micro_batch_size_per_gpu"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, "optimizer.params.lr"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}, "optimizer.type"),
    ({"optimizer": {"type": "SGD", "params": {}}}, "optimizer.params.lr"),
    ({"train_batch_size": 10}, "train_batch_size is 10"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be a positive integer"),
])
def test_refused_settings_are_named(overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate_ds_config(good_config(**overrides), "cfg.json", world_size=2)
    assert needle in str(err.value) and "cfg.json" in str(err.value)


def test_command_line_must_agree_with_file():
    with pytest.raises(ConfigError, match="--micro-batch-size 8"):
        validate_ds_config(good_config(), "cfg.json", 1, micro_batch_size=8)
    with pytest.raises(ConfigError, match="--grad-accum-steps 3"):
        validate_ds_config(good_config(), "cfg.json", 1, grad_accum_steps=3)
    config = good_config()
    del config["train_micro_batch_size_per_gpu"]
    assert validate_ds_config(config, "c", 1, micro_batch_size=8).micro_batch_size == 8


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ConfigError, match=r"bad.json is not valid JSON.*line 2"):
        read_json(bad)


def test_engine_config_accumulates_itself_and_picks_precision():
    layout = BatchLayout(4, 2, 2)
    derived = engine_config(good_config(), layout, use_bf16=False)
    # DeepSpeed must step on every engine.step(): the trainer does the K-fold accumulation.
    assert derived["gradient_accumulation_steps"] == 1
    assert derived["train_batch_size"] == 8
    assert "bf16" not in derived
    derived = engine_config(good_config(), layout, use_bf16=True)
    assert derived["bf16"] == {"enabled": True}
    assert derived["data_types"]["grad_accum_dtype"] == "fp32"
    explicit = engine_config(good_config(bf16={"enabled": False}), layout, use_bf16=True)
    assert explicit["bf16"] == {"enabled": False}


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "ds_configs").glob("*.json")):
        config = json.loads(path.read_text())
        layout = validate_ds_config(config, str(path), world_size=8)
        assert layout.micro_batch_size >= 1, path


def test_layout_for_a_checkpoints_global_batch():
    from ngdiff_ds.config import layout_for_global_batch

    two_ranks = BatchLayout(micro_batch_size=2, micro_batches_per_step=1, world_size=2)
    assert layout_for_global_batch(two_ranks, 4) is two_ranks
    one_rank = BatchLayout(micro_batch_size=2, micro_batches_per_step=1, world_size=1)
    assert layout_for_global_batch(one_rank, 4) == BatchLayout(2, 2, 1)  # 2 micro-batches
    assert layout_for_global_batch(BatchLayout(2, 3, 4), 16) == BatchLayout(2, 2, 4)
    with pytest.raises(ConfigError) as error:
        layout_for_global_batch(BatchLayout(4, 1, 3), 4)
    message = str(error.value)
    assert "global batch is 4" in message and "cannot split it evenly" in message
    assert "rank counts that work with micro-batch 4: 1" in message
    with pytest.raises(ConfigError, match="micro-batch sizes that work on 2 rank"):
        layout_for_global_batch(BatchLayout(4, 1, 2), 6)
