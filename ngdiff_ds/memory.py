"""Memory levers applied to the model before DeepSpeed wraps it.

``--gradient-checkpointing`` keeps only each decoder layer's input during the forward pass and
recomputes the layer in the backward pass (transformers' activation checkpointing, the
non-reentrant variant of ``torch.utils.checkpoint``): activations shrink from every layer's
intermediates to one tensor per layer, for about one more forward pass of compute. The
gradients are the same up to float summation order, so the NGDiff step is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from ngdiff_ds.settings import option


@dataclass
class MemorySettings:
    """Levers that trade compute for memory; none changes the math of a step."""

    gradient_checkpointing: bool = option(
        False,
        help="recompute each decoder layer in the backward pass instead of keeping its "
             "activations (transformers' non-reentrant activation checkpointing)")


def apply_memory_levers(module, settings: MemorySettings | None) -> None:
    """Turn on the chosen levers of a freshly loaded HF causal LM (before deepspeed.initialize)."""
    if settings is None:
        return
    if settings.gradient_checkpointing:
        # Non-reentrant, as torch recommends: the reentrant variant computes no gradient for a
        # checkpointed segment none of whose inputs requires grad (frozen embeddings, adapters).
        # The exported config is untouched (use_cache stays as it was).
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
