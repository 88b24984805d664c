"""A checkpoint of a run as a standard HF model directory, offline, in one plain process.

The weights are consolidated by DeepSpeed's own ``zero_to_fp32``
(``get_fp32_state_dict_from_zero_checkpoint``): it reads every rank's fp32 master partition
from the ``*_optim_states.pt`` files and the parameter shapes from the ``*_model_states.pt``
files, on CPU, without torch.distributed and without needing the world size the run had (it
is read from the files). The fp32 master is then cast to the dtype the run's own export
writes: the forward weights of a live run are exactly that cast (DeepSpeed copies the master
into them after every step), so the export of a run's final checkpoint equals its
``<output-dir>/model`` bit for bit.

Memory: one fp32 copy of the model (DeepSpeed's consolidation) plus the cast; the model
itself is built on the meta device and takes the cast tensors as its parameters.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ngdiff_ds.checkpoint import MANIFEST, check_complete, step_directories
from ngdiff_ds.engine import staged_directory
from ngdiff_ds.errors import ConfigError, DataError
from ngdiff_ds.memory import ADAPTER_DIR, lora_scale, merged_lora_state_dict

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_NOT_TOKENIZER = {"config.json", "generation_config.json", ADAPTER_DIR}
_TAG = re.compile(r"^step\d+$")  # the names tag_of gives


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The complete step directory ``checkpoint`` names: itself, or a checkpoints
    directory's ``latest`` tag."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} is not a directory")
    latest = path / "latest"
    if latest.is_file() and not (path / MANIFEST).is_file():
        tag = latest.read_text().strip()
        tag_dir = path / tag
        if not tag or not tag_dir.is_dir():
            raise DataError(f"checkpoint {path}: its 'latest' file names '{tag}', which is not a "
                            f"directory in it")
    elif ((path / MANIFEST).is_file() or _TAG.match(path.name)
          or any(path.glob("*_model_states.pt"))):  # a step directory, complete or not
        tag_dir = path
    else:
        hint = ""
        if (path / "checkpoints").is_dir():
            hint = f" (a run's output directory? pass {path / 'checkpoints'})"
        elif step_directories(path):
            hint = " (it has step directories but no 'latest' file: pass one of them)"
        raise ConfigError(f"checkpoint {path} is neither a checkpoints directory (with a 'latest' "
                          f"file) nor a step directory (with {MANIFEST}){hint}")
    if reason := check_complete(tag_dir):
        raise DataError(f"checkpoint {tag_dir} is not a complete checkpoint: {reason}")
    if not (tag_dir / "hf" / "config.json").is_file():
        raise DataError(f"checkpoint {tag_dir} has no hf/config.json (the model's config): "
                        "it was not written by this package's checkpointing")
    return tag_dir


def _as_dtype(value, where: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        name = str(value)
        dtype = DTYPES.get(name.removeprefix("torch.").lower())
        if dtype is None:
            raise ConfigError(f"{where}: unsupported dtype '{value}'; choose one of "
                              f"{', '.join(DTYPES)}")
    if dtype not in DTYPES.values():
        raise ConfigError(f"{where}: unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
    return dtype


def _run_dtype(config, tag_dir: Path) -> torch.dtype:
    """The dtype the live run exported: the model's dtype, which ``from_pretrained(dtype=...)``
    records in the config the checkpoint saved (bf16 when the DeepSpeed JSON enables it, else
    fp32). A config without one falls back to the DeepSpeed JSON stored with the checkpoint."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if value is not None:
        return _as_dtype(value, f"{tag_dir / 'hf' / 'config.json'} dtype")
    ds_config = {}
    for states in sorted(tag_dir.glob("*_model_states.pt"))[:1]:
        ds_config = torch.load(states, map_location="cpu", weights_only=False).get("ds_config", {})
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


def _build_model(config, state_dict: dict, dtype: torch.dtype, tag_dir: Path):
    """The HF model of ``config`` holding ``state_dict`` (cast to ``dtype``), without ever
    allocating its random initialisation (built on the meta device, tensors assigned)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    cast = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
            for name, tensor in state_dict.items()}
    # zero_to_fp32 restores tied parameters (lm_head.weight -> embed_tokens.weight) as the same
    # tensor; save_pretrained drops the tied copies again, as the live export does.
    result = model.load_state_dict(cast, strict=False, assign=True)
    if result.unexpected_keys:
        raise DataError(f"checkpoint {tag_dir} holds weights its hf/config.json model does not "
                        f"have: {', '.join(result.unexpected_keys[:5])}")
    model.tie_weights()
    missing = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if missing:
        raise DataError(f"checkpoint {tag_dir} lacks weights of its hf/config.json model: "
                        f"{', '.join(missing[:5])}")
    model.config.dtype = dtype
    return model.eval()


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype=None) -> Path:
    """Write the model of ``checkpoint`` (a checkpoints directory: its ``latest``; or a step
    directory) to ``out_dir`` as an HF directory (safetensors + config + tokenizer); returns
    ``out_dir``. ``dtype`` None: what the run's own export writes (the checkpoint's config
    dtype). The directory appears whole or not at all (temporary sibling, renamed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig

    tag_dir = resolve_checkpoint(checkpoint).resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir == tag_dir or out_dir in tag_dir.parents or tag_dir in out_dir.parents:
        raise ConfigError(f"output directory {out_dir} overlaps the checkpoint {tag_dir}")
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir())
                                                       or (out_dir / "config.json").is_file())):
        raise ConfigError(f"output directory {out_dir} exists and is not an HF model directory; "
                          "refusing to replace it")
    config = AutoConfig.from_pretrained(tag_dir / "hf")
    target = _run_dtype(config, tag_dir) if dtype is None else _as_dtype(dtype, "--dtype")

    print(f"consolidating {tag_dir} (DeepSpeed zero_to_fp32)", flush=True)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    adapter_config = tag_dir / "hf" / ADAPTER_DIR / "adapter_config.json"
    if adapter_config.is_file():  # a LoRA run: merge as its own export does
        state_dict = merged_lora_state_dict(state_dict, lora_scale(json.loads(adapter_config.read_text())))
    model = _build_model(config, state_dict, target, tag_dir)
    del state_dict

    with staged_directory(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        for item in sorted((tag_dir / "hf").iterdir()):  # the tokenizer the run saved, as is
            if item.name not in _NOT_TOKENIZER:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
    print(f"exported {tag_dir} ({str(target).removeprefix('torch.')}) to {out_dir}", flush=True)
    return out_dir
