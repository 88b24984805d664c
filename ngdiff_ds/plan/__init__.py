"""The plan: will a model fit, and what does a step move, before a GPU hour is spent.

Pure Python (no torch, no DeepSpeed). Given a Llama-architecture model (an HF ``config.json``
or a preset), the cluster shape and the run's settings, it gives per GPU the memory of each
part ZeRO-3 and the NGDiff step keep, and per rank and step the bytes each collective moves,
for NGDiff, NGDiff with the adaptive rate's probes, NGDiff with one shared forward, and GDiff
as the peers run it::

    from ngdiff_ds.plan import PlanSettings, load_model, make_plan, memory_breakdown
    settings = PlanSettings(preset="llama2-7b", gpus_per_node=8, nodes=(1, 2, 4))
    make_plan(settings)["configurations"][0]["fits"]           # what launch/plan.py prints
    memory_breakdown(load_model(settings), settings, "ngdiff", world_size=16).as_dict()

Notation: P all parameters, T the trainable ones (all, or the LoRA adapters), N ranks, p the
bytes of the model dtype (2 for bf16/fp16, 4 for fp32). Each parameter is partitioned into
ceil(numel / N) elements per rank, as ZeRO-3 pads it.

Memory per GPU, persistent (what the step holds from start to end):

- ``weights``: the forward-weight partition, p * P / N (every parameter, frozen ones too);
- ``master``: the fp32 master partition, 4 * T / N, a copy even in fp32 (DeepSpeed 0.19 would
  share the weight tensor only when a ``torch.device`` equals its device string, which it
  never does: measured with torch 2.13);
- ``moments``: Adam's two fp32 moments, 8 * T / N;
- ``gradients``: the gradient partition, 4 * T / N (fp32: the package sets
  ``grad_accum_dtype: fp32`` under bf16);
- ``ngdiff_extra``: the captured forget gradient, 4 * T / N, beside the gradient partition on
  the same device (``torch.empty_like`` in ``run_unlearning``); it later holds the probes' step
  delta, so the adaptive rate costs no more. GDiff has none;
- ``reduce_bucket``: the gradient bucket DeepSpeed allocates at start-up with all
  ``reduce_bucket_size`` elements in the model dtype, and keeps;
- ``reference_weights`` (``--reference-model``: the KL retaining loss): the frozen starting
  model, an inference-only ZeRO-3 engine: its weight partition p * P / N (the base model
  only, under LoRA) and its persistent parameters whole; no master, moments or gradients.
  Its logits on a retain micro-batch (p * V per token) and what the KL keeps for its
  backward (the fp32 log-softmax of those logits and its exp, 8 * V) are added to
  ``activations``.

With ``offload`` (``offload_optimizer.device: cpu``) master, moments, gradient partition and the
NGDiff copy live in host memory, with DeepSpeed's own fp32 copy of the gradient that the CPU
optimizer reads (``fp32_partitioned_groups_flat[i].grad``); ``offload_params`` moves the
weight partition there too.

Memory per GPU, transient (whichever of the two peaks is larger adds to the persistent part):

- during a pass, ``gathered`` + ``activations``. ``gathered``: the 16-bit parameters ZeRO-3
  holds gathered, assuming the ``ZeroAssumptions`` below: the persistent parameters (numel <=
  ``stage3_param_persistence_threshold``, kept gathered on every rank), at the turn from
  forward to backward the parameters reused within ``stage3_max_reuse_distance`` elements of
  the trace (the trace to a parameter's reuse covers the last layers twice: at most half that
  distance), the prefetch bucket (``stage3_prefetch_bucket_size``) and the largest module,
  capped at the whole model (``stage3_max_live_parameters`` only limits prefetching); plus the
  largest trainable module's full 16-bit gradient before its reduce-scatter. ``activations``:
  below;
- during ``engine.step()``, ``step_buffer``: DeepSpeed flattens one sub-group's gradient into
  a new fp32 tensor (``_prepare_fp32_grad_for_sub_group``), 4 * min(``sub_group_size``, T / N),
  on the GPU when the optimizer is, plus the optimizer's own temporaries of that size
  (``--optimizer``: DeepSpeed's fused Adam none, torch AdamW's foreach path on GPU one, its
  single-tensor path on CPU two; measured on CPU: exactly 3 x 4 T / N at three sizes).

Activations of one forward (h hidden, i intermediate, V vocabulary, L layers; q = heads x
head_dim; kv' = q under GQA, else kv_heads x head_dim), bytes per token of HF's Llama with
sdpa, as autograd keeps them for the backward (``layer_activation_bytes``; tests/test_plan.py
counts the saved tensors of a real model and finds these exactly):

- per layer: two RMSNorms 2 * ((4 + 2p) * h + 4), attention p * (2q + 2kv') + 4 * heads,
  SwiGLU 4p * i (no KV cache: the package's forwards pass ``use_cache=False``);
  per layer and row the padding mask sdpa keeps, p * seq^2;
- once: the final norm, the logits (p + 12) * V (the logits, the fp32 log-softmax and, at the
  loss backward's peak, two fp32 gradients; every position counted as a target), RoPE's cos
  and sin, the int64 token ids;
- with activation checkpointing the L layers shrink to each layer's input, L * p * h, plus one
  layer recomputed in full (with its mask).

NGDiff runs one task's micro-batch per forward; GDiff and the shared forward carry both tasks'
rows. With 4 x 2048 tokens of Llama-2 7B in bf16 a layer keeps 182 KiB per token, 1.4 GiB for
the micro-batch (32 layers: 45.5 GiB) without checkpointing; with it, 64 MiB of layer input.

Not counted: the CUDA context, NCCL's buffers and allocator fragmentation (the reserve covers
them), temporaries of the backward, the process's host baseline (libraries).

Communication per rank per step (bytes a rank sends, which for a ring equals what it
receives): an all-gather of a parameter moves (N - 1) * ceil(numel / N) * p; a reduce-scatter
of a gradient the same in the communication dtype (the model dtype, DeepSpeed's default); an
all-reduce of n float64 numbers 2 * (N - 1) / N * 8n. Persistent parameters are gathered once
after each optimizer step (``_post_step``), not per pass. With K micro-batches per task:

- ``ngdiff``: 2K forwards and 2K backwards, each gathering every non-persistent parameter (4K
  gathers); 2K reduce-scatters (ZeRO-3 reduces every micro-batch's gradient); one all-reduce of
  7 numbers (the Gram sums, losses, token count and stop vote);
- ``ngdiff_adaptive``: that, plus on a fit step (every ``lr_period`` steps, amortised) 3 probe
  forwards per probe micro-batch (``multiples`` -1, 0, +1 on the retain batch), a re-gather of
  the persistent parameters after each of the 4 weight edits, and one all-reduce of 3 numbers;
- ``shared_forward`` (what a shared forward would cost; it cannot run under ZeRO-3, see
  docs/design.md): K forwards over forget and retain rows together, then the two task
  backwards from the kept graph: 3K gathers, 2K reduce-scatters, the same all-reduce;
  activations of 2 * micro-batch rows (the memory is exact for K = 1: with K > 1 the retain
  gradient must be accumulated apart from the forget one, which the plan does not count);
- ``gdiff`` (the peers' GDiff: one forward and backward over the concatenated batch): 2K
  gathers, K reduce-scatters; activations of 2 * micro-batch rows; no extra partition.

Parameters kept across the forward-to-backward turn are gathered once less; the plan ignores
that, so its gathers are an upper bound.
"""

# The modules, each one step of the plan: model (dimensions, presets, parameter tensors),
# settings (PlanSettings, ZeroAssumptions, the step's constants), memory (bytes by part),
# communication (bytes by collective), report (the plan over modes and nodes, its tables).
from ngdiff_ds.plan.communication import communication_bytes, passes_per_step  # noqa: E402
from ngdiff_ds.plan.memory import (MemoryBreakdown, activation_bytes, memory_breakdown,  # noqa: E402
                                   model_state_bytes, saved_activation_bytes)
from ngdiff_ds.plan.model import (PRESETS, ModelDims, Tensor, count_parameters,  # noqa: E402
                                  dims_from_config, largest_module, lora_tensors, model_tensors)
from ngdiff_ds.plan.report import format_plan, make_plan, plan_configuration  # noqa: E402
from ngdiff_ds.plan.settings import (MODES, PROBE_MULTIPLES, PROBE_PERIOD, PROBE_TASKS,  # noqa: E402
                                     PlanSettings, ZeroAssumptions, load_model)

__all__ = ["MODES", "PRESETS", "PROBE_MULTIPLES", "PROBE_PERIOD", "PROBE_TASKS",
           "MemoryBreakdown", "ModelDims", "PlanSettings", "Tensor", "ZeroAssumptions",
           "activation_bytes", "communication_bytes", "count_parameters", "dims_from_config",
           "format_plan", "largest_module", "load_model", "lora_tensors", "make_plan",
           "memory_breakdown", "model_state_bytes", "model_tensors", "passes_per_step",
           "plan_configuration", "saved_activation_bytes"]
