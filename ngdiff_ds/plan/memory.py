"""Memory per GPU by part (the plan: see ngdiff_ds/plan/__init__.py for what each part is)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ngdiff_ds.plan.model import ModelDims, Tensor, count_parameters, largest_module
from ngdiff_ds.plan.settings import (ADAM_MOMENTS, OPTIMIZER_TEMPORARIES, Model, PlanSettings,
                                     ZeroAssumptions)

# ----- memory -----------------------------------------------------------------------------

def slice_numel(tensors: list[Tensor], world_size: int, keep=lambda t: True) -> int:
    """Elements per rank of the parameters ``keep`` selects, each padded to a multiple of the
    world size as ZeRO-3 partitions it."""
    return sum(math.ceil(t.numel / world_size) * t.count for t in tensors if keep(t))


def is_trainable(t: Tensor) -> bool:
    return t.trainable


def persistence_filter(zero: ZeroAssumptions):
    """Parameters ZeRO-3 never releases (``stage3_param_persistence_threshold``)."""
    return lambda t: t.numel <= zero.stage3_param_persistence_threshold


def rows_per_forward(mode: str, micro_batch_size: int) -> int:
    """Rows one forward carries: GDiff and the shared forward run both tasks' rows at once."""
    return 2 * micro_batch_size if mode in ("gdiff", "shared_forward") else micro_batch_size


def norm_activation_bytes(dims: ModelDims, dtype_bytes: int) -> int:
    """What HF's RMSNorm keeps per token: its fp32 input, the rsqrt, the normalised output
    cast to the model dtype and that times the weight (the next projections' input)."""
    return (4 + 2 * dtype_bytes) * dims.hidden_size + 4


def layer_activation_bytes(dims: ModelDims, dtype_bytes: int, kv_cache: bool) -> int:
    """Bytes one Llama decoder layer keeps for its backward, per token (HF's layer, sdpa).

    Two RMSNorms (``norm_activation_bytes``); attention keeps q after RoPE and sdpa's output
    (p * q_dim each; o_proj's input is a view of the output), k and v as sdpa gets them
    (repeated to q_dim under GQA: the trainer passes a padding mask, which turns sdpa's GQA path
    off) and a fp32 log-sum-exp per head (a fused kernel: no seq x seq scores); with
    ``kv_cache`` (a training forward with HF's default ``use_cache=True``; the package passes
    False) also HF's cache of k and v, 2 * kv_dim, extra only under GQA; SwiGLU keeps gate,
    silu(gate), up and their product, 4 * p * i. tests/test_plan.py checks this against the
    tensors autograd saves.
    """
    p = dtype_bytes
    gqa = dims.num_kv_heads < dims.num_heads
    sdpa_kv = 2 * (dims.q_dim if gqa else dims.kv_dim)
    cache_kv = 2 * dims.kv_dim if (kv_cache and gqa) else 0
    attention = p * (2 * dims.q_dim + sdpa_kv + cache_kv) + 4 * dims.num_heads
    mlp = 4 * p * dims.intermediate_size
    return 2 * norm_activation_bytes(dims, p) + attention + mlp


def mask_bytes(dtype_bytes: int, rows: int, seq_len: int) -> int:
    """The padding mask as each layer's sdpa keeps it: rows x seq x seq in the model dtype."""
    return rows * seq_len ** 2 * dtype_bytes


def forward_extra_bytes(dims: ModelDims, dtype_bytes: int, rows: int, seq_len: int) -> int:
    """Kept once per forward: RoPE's cos and sin, and the embedding's int64 token ids."""
    return 2 * seq_len * dims.head_dim * dtype_bytes + 8 * rows * seq_len


def saved_activation_bytes(dims: ModelDims, dtype_bytes: int, rows: int, seq_len: int,
                           kv_cache: bool) -> int:
    """All a forward without checkpointing keeps for its backward, the logits' loss aside."""
    per_token = (dims.num_layers * layer_activation_bytes(dims, dtype_bytes, kv_cache)
                 + norm_activation_bytes(dims, dtype_bytes))
    return (rows * seq_len * per_token + dims.num_layers * mask_bytes(dtype_bytes, rows, seq_len)
            + forward_extra_bytes(dims, dtype_bytes, rows, seq_len))


def logits_bytes_per_token(dims: ModelDims, dtype_bytes: int) -> int:
    """The logits in the model dtype, the fp32 log-softmax cross-entropy keeps and, at the peak
    of the loss backward, two fp32 gradients of that size: (p + 12) * vocab. Every position
    is counted as a target (an upper bound: only answer tokens go through the softmax)."""
    return (dtype_bytes + 12) * dims.vocab_size


def activation_bytes(dims: ModelDims, settings: PlanSettings, mode: str) -> int:
    """Activations of one forward at the start of its backward, per GPU.

    Without checkpointing ``saved_activation_bytes`` (no KV cache: the trainer's forwards pass
    ``use_cache=False``); with it each layer's
    input (p * h per token) and one layer recomputed in full (its mask included), plus the
    final norm and the per-forward extras. Plus the logits. LoRA runs are counted as full
    training (an upper bound: frozen projections keep less). The layer counts were measured on
    CPU (tests/test_plan.py); CUDA's fused attention kernels keep the same tensors.
    """
    rows, seq = rows_per_forward(mode, settings.micro_batch_size), settings.seq_len
    p = settings.dtype_bytes
    if settings.gradient_checkpointing:
        per_token = (dims.num_layers * p * dims.hidden_size
                     + layer_activation_bytes(dims, p, kv_cache=False)
                     + norm_activation_bytes(dims, p))
        kept = (rows * seq * per_token + mask_bytes(p, rows, seq)
                + forward_extra_bytes(dims, p, rows, seq))
    else:
        kept = saved_activation_bytes(dims, p, rows, seq, kv_cache=False)
    return kept + rows * seq * logits_bytes_per_token(dims, p)


def gathered_bytes(tensors: list[Tensor], settings: PlanSettings) -> int:
    """The gathered working set of ZeRO-3 (see ngdiff_ds/plan/__init__.py for what it assumes)."""
    zero, p = settings.zero, settings.dtype_bytes
    persistent = slice_numel(tensors, 1, persistence_filter(zero))
    released = count_parameters(tensors) - persistent
    live = min(released, zero.stage3_max_reuse_distance // 2 + zero.stage3_prefetch_bucket_size
               + largest_module(tensors))
    gradient = largest_module(tensors, trainable_only=True)
    return p * (persistent + live + gradient)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes by part: ``gpu`` per GPU, ``cpu`` per rank in host memory (offload)."""

    gpu: dict[str, int]
    cpu: dict[str, int]

    PERSISTENT = ("weights", "master", "moments", "gradients", "ngdiff_extra", "reduce_bucket",
                  "reference_weights")

    @property
    def gpu_peak(self) -> int:
        """Persistent parts plus the larger transient peak (a pass, or the optimizer step)."""
        persistent = sum(self.gpu.get(part, 0) for part in self.PERSISTENT)
        return persistent + max(self.gpu["gathered"] + self.gpu["activations"],
                                self.gpu["step_buffer"])

    @property
    def cpu_per_rank(self) -> int:
        return sum(self.cpu.values())

    def as_dict(self) -> dict:
        """The parts and totals, in bytes; on a CPU-only run every part is host memory, so
        ``gpu_peak + cpu_per_rank`` is what RSS above the process baseline should show."""
        return {"gpu": dict(self.gpu), "cpu": dict(self.cpu), "gpu_peak": self.gpu_peak,
                "cpu_per_rank": self.cpu_per_rank}


def memory_breakdown(model: Model, settings: PlanSettings, mode: str,
                     world_size: int) -> MemoryBreakdown:
    """Memory by part of one rank of ``world_size`` running ``mode`` (``model`` from
    ``load_model``)."""
    dims, tensors = model
    p = settings.dtype_bytes
    weights = p * slice_numel(tensors, world_size)
    trainable = slice_numel(tensors, world_size, is_trainable)
    optimizer_side = {"master": 4 * trainable, "moments": 4 * ADAM_MOMENTS * trainable,
                      "gradients": 4 * trainable,
                      "ngdiff_extra": 0 if mode == "gdiff" else 4 * trainable}
    gpu = {"weights": 0 if settings.offload_params else weights,
           "reduce_bucket": p * settings.zero.reduce_bucket_size}
    cpu = {"weights": weights} if settings.offload_params else {}
    if settings.offload:
        cpu.update(optimizer_side, offload_gradient_copy=4 * trainable)
        gpu.update(dict.fromkeys(optimizer_side, 0), step_buffer=0)
    else:
        gpu.update(optimizer_side,
                   step_buffer=4 * min(settings.zero.sub_group_size, trainable)
                   * (1 + OPTIMIZER_TEMPORARIES[settings.optimizer]))
    gpu["gathered"] = gathered_bytes(tensors, settings)
    gpu["activations"] = activation_bytes(dims, settings, mode)
    gpu["reference_weights"] = 0
    if settings.reference_model:
        # the frozen starting model of the KL retaining loss: an inference-only ZeRO-3 engine
        # (its weight partition, every rank's copy of its persistent parameters; no master,
        # moments or gradients) and its logits, held beside the retain forward's until the
        # loss is computed (in the model dtype, every position), plus what the KL keeps for
        # its backward: the fp32 log-softmax of those logits and its exp (8 bytes per
        # vocabulary entry, every position counted as a target as for the logits)
        base = [t for t in tensors if not (settings.lora and t.trainable)]
        reference = p * (slice_numel(base, world_size)
                         + slice_numel(base, 1, persistence_filter(settings.zero)))
        if settings.offload_params:
            cpu["reference_weights"] = reference
        else:
            gpu["reference_weights"] = reference
        gpu["activations"] += (settings.micro_batch_size * settings.seq_len * (p + 8)
                               * dims.vocab_size)
    return MemoryBreakdown(gpu=gpu, cpu=cpu)


def model_state_bytes(model: Model, settings: PlanSettings,
                      gpus_per_node: int, num_nodes: int) -> dict[str, int]:
    """The parts DeepSpeed's ``estimate_zero3_model_states_mem_needs`` counts, like for like:
    per GPU the partitions on the GPU plus the largest module and its gradient in 16-bit
    (its ``4 * largest_layer_params``); per node the partitions in host memory (weights,
    master, moments, gradient: not the NGDiff copy or DeepSpeed's second gradient copy)."""
    _, tensors = model
    parts = memory_breakdown(model, settings, "ngdiff", gpus_per_node * num_nodes)
    counted = ("weights", "master", "moments", "gradients")
    on_gpu = sum(parts.gpu.get(k, 0) for k in counted)
    largest = 2 * settings.dtype_bytes * largest_module(tensors)
    on_cpu = sum(parts.cpu.get(k, 0) for k in counted)
    return {"gpu": on_gpu + largest, "cpu_per_node": gpus_per_node * on_cpu}
