"""Build the model, tokenizer and DeepSpeed ZeRO-3 engines; save the result as an HF directory.

Two kinds of engine: a training engine (optimizer, gradient partition: the model being
unlearned or fine-tuned) and an inference-only one (sharded weights and nothing else: the
retain-only reference, a saved model under evaluation).

Loading goes through ``HfDeepSpeedConfig`` so that ``from_pretrained`` creates the model inside
``deepspeed.zero.Init``: each rank materialises only its own slice of every weight, never a
full copy, which is what lets a 7B+ model load on GPUs that cannot hold it whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ngdiff_ds.config import inference_config, uses_bf16
from ngdiff_ds.distributed import barrier, is_main_process
from ngdiff_ds.errors import ModelError
from ngdiff_ds.memory import (ADAPTER_DIR, MemorySettings, adapter_state_dict, apply_memory_levers,
                              lora_scale, merged_lora_state_dict)
from ngdiff_ds.zero3 import ZeroPartitions, consolidated_state_dict


def resolve_model(model: str) -> str:
    """A local HF model directory, or a hub id (only loadable where the hub is reachable)."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json; pass a directory "
                             "written by save_pretrained")
        return str(path)
    # A hub id is "name" or "org/name"; anything else that does not exist is a bad path.
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelError(f"model path {model} does not exist")
    return model  # a hub id such as org/name


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except Exception as err:  # hub ids fail here when offline
        raise ModelError(_load_failure(model, "tokenizer", err)) from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of every loss, so any id will do; EOS is the
        # usual choice for models shipped without a pad token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_failure(model: str, what: str, err: Exception) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(model).expanduser().exists():
        return f"could not load the {what} from {model}: {first_line}"
    return (f"could not load the {what} '{model}': it is not a local directory, and hub ids "
            f"only work where the Hugging Face hub is reachable ({first_line})")


@dataclass
class TrainingEngine:
    """What the trainer needs: the DeepSpeed engine and this rank's flat partitions."""

    engine: object
    partitions: ZeroPartitions
    hf_ds_config: object  # must stay referenced while the model lives (transformers keeps a weakref)
    memory: MemorySettings | None = None  # the levers it was built with (LoRA: how to export)

    @property
    def uses_lora(self) -> bool:
        return self.memory is not None and self.memory.lora_rank > 0

    @property
    def model(self):
        return self.engine.module

    @property
    def device(self):
        return self.engine.device


def _load_sharded(model: str, ds_config: dict):
    """``from_pretrained`` straight into ZeRO-3 partitions; returns (module, hf_ds_config)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = HfDeepSpeedConfig(ds_config)  # before from_pretrained: enables zero.Init
    dtype = torch.bfloat16 if uses_bf16(ds_config) else torch.float32
    try:
        module = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    except Exception as err:
        raise ModelError(_load_failure(model, "model", err)) from None
    return module, hf_ds_config


def build_engine(model: str, ds_config: dict, memory: MemorySettings | None = None) -> TrainingEngine:
    """Load ``model`` straight into ZeRO-3 partitions, apply the memory levers, and wrap it in
    a DeepSpeed engine."""
    import deepspeed

    module, hf_ds_config = _load_sharded(model, ds_config)
    module.train()  # from_pretrained returns eval mode
    module = apply_memory_levers(module, memory)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                           config=ds_config)
    return TrainingEngine(engine=engine, partitions=ZeroPartitions(engine), hf_ds_config=hf_ds_config,
                          memory=memory)


@dataclass
class InferenceEngine:
    """A frozen ZeRO-3 model for scoring and generation: sharded weights, no optimizer state,
    no gradient buffer (DeepSpeed builds its parameter-offload wrapper, not an optimizer)."""

    engine: object
    hf_ds_config: object  # kept referenced, as in TrainingEngine


def build_inference_engine(model: str, ds_config: dict) -> InferenceEngine:
    """``model`` sharded over the ranks for forward passes only."""
    import deepspeed

    config = inference_config(ds_config)
    module, hf_ds_config = _load_sharded(model, config)
    module.eval()
    module.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=module, config=config)
    return InferenceEngine(engine=engine, hf_ds_config=hf_ds_config)


def set_learning_rate(engine, lr: float) -> None:
    """Set this step's rate on every param group (no DeepSpeed scheduler is configured)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def save_hf_model(built: TrainingEngine, tokenizer, out_dir: str | Path) -> None:
    """Write a standard HF directory (safetensors + config + tokenizer); all ranks call this.

    Rank 0 writes into a temporary sibling directory and renames it into place, so a crash
    while saving never leaves a half-written model where a finished one is expected.
    """
    state_dict = consolidated_state_dict(built.engine)
    if is_main_process():
        with staged_directory(out_dir) as staging:
            if built.uses_lora:
                _save_lora_model(built, state_dict, staging)
            else:
                built.model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
    barrier()


def _save_lora_model(built: TrainingEngine, state_dict: dict, out_dir: Path) -> None:
    """The merged model (a plain HF directory), and with ``--save-adapter`` the adapter alone
    in peft's format under ``adapter/``."""
    from safetensors.torch import save_file

    adapter_config = built.model.peft_config["default"]
    merged = merged_lora_state_dict(state_dict, lora_scale(adapter_config.to_dict()))
    built.model.get_base_model().save_pretrained(out_dir, state_dict=merged,
                                                 safe_serialization=True)
    if built.memory.save_adapter:
        adapter_config.save_pretrained(out_dir / ADAPTER_DIR)
        tensors = {k: v.contiguous() for k, v in adapter_state_dict(state_dict).items()}
        save_file(tensors, out_dir / ADAPTER_DIR / "adapter_model.safetensors")


def save_adapter_config(built: TrainingEngine, directory: Path) -> None:
    """With LoRA, the adapter config beside a checkpoint's HF config: what an offline export
    needs to merge the adapters (rank 0)."""
    if built.uses_lora:
        built.model.peft_config["default"].save_pretrained(directory / ADAPTER_DIR)


@contextmanager
def staged_directory(out_dir: str | Path):
    """A temporary sibling of ``out_dir`` to write into: renamed to ``out_dir`` (replacing it)
    when the block succeeds, removed when it fails, so a crash never leaves a half-written
    directory where a finished one is expected. Its mode follows the umask, as a plain
    ``mkdir`` would (``mkdtemp`` alone makes it private to its owner)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
