"""Memory levers applied to the model before DeepSpeed wraps it; none changes a step's math.

``--gradient-checkpointing`` keeps only each decoder layer's input during the forward pass and
recomputes the layer in the backward pass (transformers' activation checkpointing, the
non-reentrant variant of ``torch.utils.checkpoint``): activations shrink from every layer's
intermediates to one tensor per layer, for about one more forward pass of compute. The
gradients are the same up to float summation order, so the NGDiff step is unchanged.

``--lora-rank R`` trains LoRA adapters (``peft``) on the ``--lora-targets`` projections and
freezes everything else: ZeRO-3's optimizer state, gradient partition and NGDiff's extra
partition then cover the adapters only, and the norms and the direction are those of the
adapter gradients (the step's math is unchanged; it runs on fewer parameters). The frozen
base stays partitioned in 16 bits. The export merges the adapters into the weights
(``W + alpha / R * B @ A``); ``--save-adapter`` also writes the adapter alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.settings import invalid, option

# Adapters start from the same draw on every rank and in every run: ZeRO-3 partitions each
# rank's copy as it finds it, and a resumed or compared run must start from the same point.
LORA_INIT_SEED = 0
ADAPTER_DIR = "adapter"


@dataclass
class MemorySettings:
    """Levers that trade compute or trainable parameters for memory."""

    gradient_checkpointing: bool = option(
        False,
        help="recompute each decoder layer in the backward pass instead of keeping its "
             "activations (transformers' non-reentrant activation checkpointing)")
    lora_rank: int = option(0, help="train LoRA adapters of this rank instead of the full "
                                    "weights (0: full fine-tuning)")
    lora_alpha: float | None = option(None, help="LoRA scale numerator (default: 2 x rank)")
    lora_targets: str = option("q_proj,k_proj,v_proj,o_proj",
                               help="comma-separated module names that get adapters")
    save_adapter: bool = option(False, help="with --lora-rank: also write the adapter alone "
                                            "(peft format) to <output-dir>/model/adapter")

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            invalid(self, "lora_rank", "must be >= 0")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            invalid(self, "lora_alpha", "must be positive")
        if not self.target_modules:
            invalid(self, "lora_targets", "must name at least one module")
        if self.save_adapter and not self.lora_rank:
            invalid(self, "save_adapter", "needs --lora-rank")

    @property
    def target_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]

    def lora_identity(self) -> dict | None:
        """What a checkpoint of these adapters must match to be resumed (None: no LoRA)."""
        if not self.lora_rank:
            return None
        return {"rank": self.lora_rank, "alpha": self.lora_alpha or 2 * self.lora_rank,
                "targets": sorted(self.target_modules)}

    def lora_config(self):
        """peft's LoraConfig for these settings (None without LoRA)."""
        if not self.lora_rank:
            return None
        from peft import LoraConfig

        # Dropout 0: a random mask would make the probes' forwards disagree with the step's.
        return LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha or 2 * self.lora_rank,
                          target_modules=self.target_modules, lora_dropout=0.0, bias="none",
                          task_type="CAUSAL_LM")


def apply_memory_levers(module, settings: MemorySettings | None):
    """Return a freshly loaded HF causal LM with the chosen levers on (before
    deepspeed.initialize): the same module, or its peft wrapper with LoRA."""
    if settings is None:
        return module
    if settings.gradient_checkpointing:
        # Non-reentrant, as torch recommends: the reentrant variant computes no gradient for a
        # checkpointed segment none of whose inputs requires grad (frozen embeddings, adapters).
        # The exported config is untouched (use_cache stays as it was).
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.lora_rank:
        from peft import get_peft_model

        missing = [name for name in settings.target_modules
                   if not any(n.split(".")[-1] == name for n, _ in module.named_modules())]
        if missing:
            raise ConfigError(f"--lora-targets: the model has no module named {', '.join(missing)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(LORA_INIT_SEED)
            module = get_peft_model(module, settings.lora_config())
    return module


def merged_lora_state_dict(state_dict: dict, scale: float) -> dict:
    """A peft model's full state dict as the plain model's: every adapted weight becomes
    ``W + scale * B @ A`` (computed in float32, cast back), the adapters and peft's key
    prefixes go. ``scale`` is ``lora_alpha / r``."""
    plain = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_A." in name or ".lora_B." in name:
            continue
        plain[name.replace(".base_layer.", ".")] = tensor
    for key, down in state_dict.items():
        if ".lora_A." not in key:
            continue
        module, adapter = key.split(".lora_A.")
        up = state_dict[f"{module}.lora_B.{adapter}"]
        name = module.removeprefix("base_model.model.") + ".weight"
        base = plain[name]
        plain[name] = (base.float() + scale * (up.float() @ down.float())).to(base.dtype)
    return plain


def adapter_state_dict(state_dict: dict) -> dict:
    """The adapters alone, keyed as peft saves them (the adapter name dropped)."""
    return {key.replace(".default.", "."): tensor for key, tensor in state_dict.items()
            if ".lora_A." in key or ".lora_B." in key}


def lora_scale(adapter_config: dict) -> float:
    return adapter_config["lora_alpha"] / adapter_config["r"]
