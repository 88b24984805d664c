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
  ``reduce_bucket_size`` elements in the model dtype, and keeps.

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
- ``shared_forward``: K forwards over forget and retain rows together, then the two task
  backwards from the kept graph: 3K gathers, 2K reduce-scatters, the same all-reduce;
  activations of 2 * micro-batch rows (the memory is exact for K = 1: with K > 1 the retain
  gradient must be accumulated apart from the forget one, which the plan does not count);
- ``gdiff`` (the peers' GDiff: one forward and backward over the concatenated batch): 2K
  gathers, K reduce-scatters; activations of 2 * micro-batch rows; no extra partition.

Parameters kept across the forward-to-backward turn are gathered once less; the plan ignores
that, so its gathers are an upper bound.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.settings import invalid, option

GIB = 2 ** 30
MODES = ("ngdiff", "ngdiff_adaptive", "shared_forward", "gdiff")
PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes per element of the model dtype
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_MODEL_TYPES = ("llama", "mistral")  # the same decoder block and parameter shapes

# The adaptive rate's defaults (adaptive_lr.AdaptiveLRConfig; tests/test_plan.py checks them):
# a fit every 8 steps, the probe loss at 3 step multiples on the retain batch only.
PROBE_PERIOD = 8
PROBE_MULTIPLES = 3
PROBE_TASKS = 1
# One all-reduce per step: 3 Gram sums, 2 losses, the token count, the stop vote (trainer.py).
STEP_ALL_REDUCE_NUMBERS = 7
ADAM_MOMENTS = 2
# Partition-sized temporaries the optimizer creates in its step, by implementation.
OPTIMIZER_TEMPORARIES = {"fused": 0, "torch-foreach": 1, "torch-single": 2}


@dataclass(frozen=True)
class ModelDims:
    """The dimensions of a Llama-architecture causal LM that decide its parameter shapes."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _preset(name, vocab, hidden, intermediate, layers, heads, kv_heads) -> ModelDims:
    return ModelDims(name, vocab, hidden, intermediate, layers, heads, kv_heads, hidden // heads)


# The public config.json values of each model (none of them ties its embeddings).
PRESETS = {dims.name: dims for dims in (
    _preset("llama2-7b", 32000, 4096, 11008, 32, 32, 32),
    _preset("llama2-13b", 32000, 5120, 13824, 40, 40, 40),
    _preset("llama2-70b", 32000, 8192, 28672, 80, 64, 8),
    _preset("llama3-8b", 128256, 4096, 14336, 32, 32, 8),
    _preset("llama3-70b", 128256, 8192, 28672, 80, 64, 8),
)}


def dims_from_config(path: str | Path) -> ModelDims:
    """``ModelDims`` from an HF model directory (or its ``config.json``); ConfigError names
    the file and the missing or unsupported field."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--config {path}: no config.json there")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"--config {file}: not readable JSON ({error})") from None
    model_type = config.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES:
        raise ConfigError(f"--config {file}: model_type {model_type!r} is not one the plan "
                          f"counts (a Llama-architecture block: {', '.join(LLAMA_MODEL_TYPES)})")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [key for key in required if not isinstance(config.get(key), int)]
    if missing:
        raise ConfigError(f"--config {file}: needs integer {', '.join(missing)}")
    heads = config["num_attention_heads"]
    return ModelDims(
        name=str(path), vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)))


# ----- the parameters ---------------------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    """``count`` parameters of ``numel`` elements each, belonging to modules named ``module``."""

    module: str
    numel: int
    count: int
    trainable: bool = True


def _linear(name: str, in_features: int, out_features: int, bias: bool, count: int):
    tensors = [Tensor(name, in_features * out_features, count)]
    if bias:
        tensors.append(Tensor(name, out_features, count))
    return tensors


def _layer_linears(dims: ModelDims) -> dict[str, tuple[int, int, bool]]:
    """(in_features, out_features, bias) of each projection of one decoder layer."""
    h, i = dims.hidden_size, dims.intermediate_size
    return {"q_proj": (h, dims.q_dim, dims.attention_bias),
            "k_proj": (h, dims.kv_dim, dims.attention_bias),
            "v_proj": (h, dims.kv_dim, dims.attention_bias),
            "o_proj": (dims.q_dim, h, dims.attention_bias),
            "gate_proj": (h, i, dims.mlp_bias), "up_proj": (h, i, dims.mlp_bias),
            "down_proj": (i, h, dims.mlp_bias)}


def model_tensors(dims: ModelDims) -> list[Tensor]:
    """Every parameter of ``LlamaForCausalLM`` (a tied head shares the embedding's)."""
    h, layers = dims.hidden_size, dims.num_layers
    tensors = [Tensor("embed_tokens", dims.vocab_size * h, 1)]
    for name, (fan_in, fan_out, bias) in _layer_linears(dims).items():
        tensors += _linear(name, fan_in, fan_out, bias, layers)
    tensors += [Tensor("input_layernorm", h, layers), Tensor("post_attention_layernorm", h, layers),
                Tensor("norm", h, 1)]
    if not dims.tie_word_embeddings:
        tensors.append(Tensor("lm_head", dims.vocab_size * h, 1))
    return tensors


def lora_tensors(dims: ModelDims, rank: int, targets) -> list[Tensor]:
    """peft's adapters: per targeted projection ``lora_A`` (rank x in) and ``lora_B``
    (out x rank), each its own module."""
    linears = _layer_linears(dims)
    tensors = []
    for name in targets:
        fan_in, fan_out, _ = linears[name]
        tensors += [Tensor(f"{name}.lora_A", rank * fan_in, dims.num_layers),
                    Tensor(f"{name}.lora_B", fan_out * rank, dims.num_layers)]
    return tensors


def _frozen(tensors: list[Tensor]) -> list[Tensor]:
    return [Tensor(t.module, t.numel, t.count, trainable=False) for t in tensors]


def count_parameters(tensors: list[Tensor], trainable_only: bool = False) -> int:
    return sum(t.numel * t.count for t in tensors if t.trainable or not trainable_only)


def largest_module(tensors: list[Tensor], trainable_only: bool = False) -> int:
    """Parameters of the largest module (what ZeRO-3 gathers at once, DeepSpeed's
    ``largest_layer_params``)."""
    per_module = {}
    for t in tensors:
        if t.trainable or not trainable_only:
            per_module[t.module] = per_module.get(t.module, 0) + t.numel
    return max(per_module.values(), default=0)


# ----- what is assumed of DeepSpeed ---------------------------------------------------------

@dataclass(frozen=True)
class ZeroAssumptions:
    """The ``zero_optimization`` values the plan assumes: those of ds_configs/zero3_bf16.json
    (DeepSpeed's defaults, except ``reduce_bucket_size``, whose default is 5e8)."""

    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_param_persistence_threshold: int = 100_000
    reduce_bucket_size: int = 50_000_000
    sub_group_size: int = 1_000_000_000


# ----- the settings -----------------------------------------------------------------------

@dataclass
class PlanSettings:
    """What the plan is asked about; invalid values raise ConfigError naming the flag."""

    preset: str | None = option(None, help=f"public model dimensions: {', '.join(PRESETS)}")
    config: str | None = option(None, metavar="DIR",
                                help="an HF model directory (or config.json) instead of --preset")
    gpus_per_node: int = option(8, help="GPUs (ranks) per node")
    nodes: tuple[int, ...] = option((1, 2, 4, 8), help="node counts to plan for")
    gpu_memory: float = option(80.0, metavar="GIB", help="memory of one GPU, GiB")
    reserve: float = option(0.10, metavar="FRACTION",
                            help="fraction of --gpu-memory kept free for the CUDA context, "
                                 "NCCL buffers and fragmentation")
    cpu_memory: float = option(0.0, metavar="GIB",
                               help="host memory per node, GiB (0: not checked)")
    precision: str = option("bf16", help="model dtype: bf16, fp16 (counted like bf16; the "
                                         "trainer refuses fp16) or fp32")
    offload: bool = option(False, help="optimizer state on the CPU (offload_optimizer)")
    offload_params: bool = option(False, help="weight partitions on the CPU too (offload_param;"
                                              " needs --offload)")
    optimizer: str = option("fused", help="the Adam implementation, for its step's temporaries: "
                                          "fused (DeepSpeed's fused or CPU Adam: none), "
                                          "torch-foreach (torch AdamW on GPU: one partition), "
                                          "torch-single (torch AdamW on CPU: two)")
    lora: bool = option(False, help="train LoRA adapters only (the base stays frozen)")
    lora_rank: int = option(8, help="LoRA rank r")
    lora_targets: tuple[str, ...] = option(("q_proj", "k_proj", "v_proj", "o_proj"),
                                           help="projections that get adapters")
    micro_batch_size: int = option(4, help="rows per micro-batch per task per rank")
    seq_len: int = option(2048, help="tokens per row")
    grad_accum_steps: int = option(1, help="K: micro-batches per task per step")
    gradient_checkpointing: bool = option(False, help="activation checkpointing (per layer)")
    lr_period: int = option(PROBE_PERIOD, help="steps between the adaptive rate's fits")
    modes: tuple[str, ...] = option(MODES, help=f"what to plan: {', '.join(MODES)}")
    zero: ZeroAssumptions = ZeroAssumptions()  # not a flag: the plan's stated assumptions

    def __post_init__(self) -> None:
        self.nodes, self.modes = tuple(self.nodes), tuple(self.modes)
        self.lora_targets = tuple(self.lora_targets)
        if (self.preset is None) == (self.config is None):
            raise ConfigError("give one of --preset or --config (the model to plan for)")
        if self.preset is not None and self.preset not in PRESETS:
            invalid(self, "preset", f"must be one of {', '.join(PRESETS)}")
        for name in ("gpus_per_node", "micro_batch_size", "seq_len", "grad_accum_steps",
                     "lora_rank", "lr_period"):
            if getattr(self, name) < 1:
                invalid(self, name, "must be at least 1")
        if not self.nodes or min(self.nodes) < 1:
            invalid(self, "nodes", "must all be at least 1")
        if not self.gpu_memory > 0:
            invalid(self, "gpu_memory", "must be positive")
        if not self.cpu_memory >= 0:
            invalid(self, "cpu_memory", "must be 0 (not checked) or positive")
        if not 0 <= self.reserve < 1:
            invalid(self, "reserve", "must be in [0, 1)")
        self._check_choices()

    def _check_choices(self) -> None:
        if self.precision not in PRECISIONS:
            invalid(self, "precision", f"must be one of {', '.join(PRECISIONS)}")
        if self.offload_params and not self.offload:
            invalid(self, "offload_params", "needs --offload (the plan, like DeepSpeed's "
                                            "estimator, offloads parameters only with the "
                                            "optimizer)")
        if not self.lora_targets or not set(self.lora_targets) <= set(LORA_TARGETS):
            invalid(self, "lora_targets", f"must be among {', '.join(LORA_TARGETS)}")
        if not self.modes or not set(self.modes) <= set(MODES):
            invalid(self, "modes", f"must be among {', '.join(MODES)}")
        if self.optimizer not in OPTIMIZER_TEMPORARIES:
            invalid(self, "optimizer", f"must be one of {', '.join(OPTIMIZER_TEMPORARIES)}")

    @property
    def dtype_bytes(self) -> int:
        return PRECISIONS[self.precision]


Model = tuple[ModelDims, list[Tensor]]  # what load_model returns and the counts take


def load_model(settings: PlanSettings) -> Model:
    """The model's dimensions and parameters: frozen base plus adapters under LoRA."""
    dims = PRESETS[settings.preset] if settings.preset else dims_from_config(settings.config)
    tensors = model_tensors(dims)
    if settings.lora:
        tensors = _frozen(tensors) + lora_tensors(dims, settings.lora_rank, settings.lora_targets)
    return dims, tensors


# ----- memory -----------------------------------------------------------------------------

def _slice_numel(tensors: list[Tensor], world_size: int, keep=lambda t: True) -> int:
    """Elements per rank of the parameters ``keep`` selects, each padded to a multiple of the
    world size as ZeRO-3 partitions it."""
    return sum(math.ceil(t.numel / world_size) * t.count for t in tensors if keep(t))


def _trainable(t: Tensor) -> bool:
    return t.trainable


def _is_persistent(zero: ZeroAssumptions):
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
    """The gathered working set of ZeRO-3 (see the module docstring for what it assumes)."""
    zero, p = settings.zero, settings.dtype_bytes
    persistent = _slice_numel(tensors, 1, _is_persistent(zero))
    released = count_parameters(tensors) - persistent
    live = min(released, zero.stage3_max_reuse_distance // 2 + zero.stage3_prefetch_bucket_size
               + largest_module(tensors))
    trainable = count_parameters(tensors, trainable_only=True)
    gradient = largest_module(tensors, trainable_only=True)
    return p * (persistent + live + gradient)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes by part: ``gpu`` per GPU, ``cpu`` per rank in host memory (offload)."""

    gpu: dict[str, int]
    cpu: dict[str, int]

    PERSISTENT = ("weights", "master", "moments", "gradients", "ngdiff_extra", "reduce_bucket")

    @property
    def gpu_peak(self) -> int:
        """Persistent parts plus the larger transient peak (a pass, or the optimizer step)."""
        persistent = sum(self.gpu[part] for part in self.PERSISTENT)
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
    weights = p * _slice_numel(tensors, world_size)
    trainable = _slice_numel(tensors, world_size, _trainable)
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


# ----- communication ----------------------------------------------------------------------

def passes_per_step(mode: str, settings: PlanSettings) -> dict[str, float]:
    """Parameter gathers (forward, backward, probe forwards) and gradient reduce-scatters per
    step, and the rate of fit steps (the probes' amortisation)."""
    k = settings.grad_accum_steps
    forwards = {"ngdiff": 2 * k, "ngdiff_adaptive": 2 * k, "shared_forward": k, "gdiff": k}[mode]
    backwards = k if mode == "gdiff" else 2 * k
    fit_rate = 1 / settings.lr_period if mode == "ngdiff_adaptive" else 0.0
    return {"forward_gathers": forwards, "backward_gathers": backwards,
            "probe_gathers": fit_rate * PROBE_MULTIPLES * PROBE_TASKS * k,
            "reduce_scatters": backwards, "fit_steps_per_step": fit_rate}


def _all_reduce_bytes(numbers: float, world_size: int) -> float:
    return 2 * (world_size - 1) / world_size * 8 * numbers


def communication_bytes(model: Model, settings: PlanSettings,
                        mode: str, world_size: int) -> dict[str, float]:
    """Bytes one rank sends per step, by collective (see the module docstring)."""
    _, tensors = model
    p, n = settings.dtype_bytes, world_size
    is_persistent = _is_persistent(settings.zero)
    gather = (n - 1) * p * _slice_numel(tensors, n, lambda t: not is_persistent(t))
    persistent = (n - 1) * p * _slice_numel(tensors, n, is_persistent)
    reduce = (n - 1) * p * _slice_numel(tensors, n, _trainable)
    passes = passes_per_step(mode, settings)
    fits = passes["fit_steps_per_step"]
    step_numbers = 0 if mode == "gdiff" else STEP_ALL_REDUCE_NUMBERS
    volume = {
        "all_gather_forward": passes["forward_gathers"] * gather,
        "all_gather_backward": passes["backward_gathers"] * gather,
        "all_gather_probes": passes["probe_gathers"] * gather,
        # after each step (_post_step), and after each probe weight edit (zero3.py)
        "all_gather_persistent": (1 + fits * (PROBE_MULTIPLES + 1)) * persistent,
        "reduce_scatter": passes["reduce_scatters"] * reduce,
        "all_reduce": _all_reduce_bytes(step_numbers + fits * PROBE_MULTIPLES, n),
    }
    volume["total"] = sum(volume.values())
    return volume


# ----- the plan ---------------------------------------------------------------------------

def plan_configuration(model: Model, settings: PlanSettings, mode: str, num_nodes: int) -> dict:
    """Memory, fit and communication of ``mode`` on ``num_nodes`` nodes."""
    world = settings.gpus_per_node * num_nodes
    memory = memory_breakdown(model, settings, mode, world)
    usable_gpu = settings.gpu_memory * (1 - settings.reserve) * GIB
    cpu_per_node = settings.gpus_per_node * memory.cpu_per_rank
    fits_cpu = settings.cpu_memory == 0 or cpu_per_node <= settings.cpu_memory * GIB
    return {"mode": mode, "nodes": num_nodes, "gpus": world,
            "fits": bool(memory.gpu_peak <= usable_gpu and fits_cpu),
            "memory_bytes": {**memory.as_dict(), "cpu_per_node": cpu_per_node},
            "communication_bytes": communication_bytes(model, settings, mode, world),
            "passes_per_step": passes_per_step(mode, settings)}


def smallest_fitting_nodes(configurations: list[dict], mode: str) -> int | None:
    fitting = [c["nodes"] for c in configurations if c["mode"] == mode and c["fits"]]
    return min(fitting, default=None)


def make_plan(settings: PlanSettings) -> dict:
    """The whole plan as one JSON-ready dict (what ``launch/plan.py --json`` prints)."""
    model = load_model(settings)
    dims, tensors = model
    configurations = [plan_configuration(model, settings, mode, nodes)
                      for mode in settings.modes for nodes in sorted(set(settings.nodes))]
    return {
        "model": {**asdict(dims), "parameters": count_parameters(tensors),
                  "trainable_parameters": count_parameters(tensors, trainable_only=True),
                  "largest_module_parameters": largest_module(tensors)},
        "settings": {f.name: getattr(settings, f.name) for f in fields(settings)
                     if f.name != "zero"},
        "assumptions": {"zero_optimization": asdict(settings.zero),
                        "usable_gpu_bytes": settings.gpu_memory * (1 - settings.reserve) * GIB,
                        "probe": {"period": settings.lr_period, "multiples": PROBE_MULTIPLES,
                                  "probe_tasks": PROBE_TASKS},
                        "optimizer": "Adam(W): two fp32 moments"},
        "configurations": configurations,
        "smallest_fitting_nodes": {mode: smallest_fitting_nodes(configurations, mode)
                                   for mode in settings.modes},
    }


# ----- the table --------------------------------------------------------------------------

_MEMORY_COLUMNS = ("weights", "master", "moments", "gradients", "ngdiff_extra", "reduce_bucket",
                   "gathered",
                   "activations", "step_buffer")


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = [header, ["---"] * len(header), *rows]
        return ["| " + " | ".join(line) + " |" for line in lines]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths))
            for row in [header, *rows]]


def _memory_rows(configurations: list[dict]) -> list[list[str]]:
    rows = []
    for c in configurations:
        memory = c["memory_bytes"]
        rows.append([c["mode"], str(c["nodes"]), str(c["gpus"]),
                     *(_gib(memory["gpu"][part]) for part in _MEMORY_COLUMNS),
                     _gib(memory["gpu_peak"]), _gib(memory["cpu_per_node"]),
                     "yes" if c["fits"] else "NO"])
    return rows


def _communication_rows(configurations: list[dict]) -> list[list[str]]:
    rows = []
    for c in configurations:
        volume, passes = c["communication_bytes"], c["passes_per_step"]
        gathers = passes["forward_gathers"] + passes["backward_gathers"] + passes["probe_gathers"]
        rows.append([c["mode"], str(c["nodes"]), f"{gathers:g}", str(passes["reduce_scatters"]),
                     _gib(volume["all_gather_forward"] + volume["all_gather_backward"]
                          + volume["all_gather_probes"] + volume["all_gather_persistent"]),
                     _gib(volume["reduce_scatter"]), f"{volume['all_reduce']:.0f}",
                     _gib(volume["total"])])
    return rows


def _heading(plan: dict) -> str:
    model, settings = plan["model"], plan["settings"]
    usable = plan["assumptions"]["usable_gpu_bytes"]
    return (f"{model['name']}: {model['parameters'] / 1e9:.2f} B parameters, "
            f"{model['trainable_parameters'] / 1e9:.3g} B trainable; {settings['precision']}, "
            f"micro-batch {settings['micro_batch_size']} x {settings['seq_len']} tokens, "
            f"K = {settings['grad_accum_steps']}, activation checkpointing "
            f"{'on' if settings['gradient_checkpointing'] else 'off'}, optimizer "
            f"{'offloaded' if settings['offload'] else 'on GPU'}; GPUs per node: "
            f"{settings['gpus_per_node']}, {_gib(usable)} of {settings['gpu_memory']:g} GiB "
            "usable per GPU")


def _smallest_line(plan: dict) -> str:
    nodes = list(plan["settings"]["nodes"])
    found = [f"{mode}: {smallest if smallest is not None else f'none of {nodes}'}"
             for mode, smallest in plan["smallest_fitting_nodes"].items()]
    return "smallest node count that fits: " + "; ".join(found)


def format_plan(plan: dict, markdown: bool = False) -> str:
    """The plan as readable tables (GiB), or as markdown tables."""
    configurations = plan["configurations"]
    lines = [_heading(plan), "",
             "memory per GPU, GiB (peak = persistent parts + max(gathered + activations, "
             "step_buffer); cpu/node: host memory per node)"]
    lines += _table(["mode", "nodes", "GPUs", *_MEMORY_COLUMNS, "peak", "cpu/node", "fits"],
                    _memory_rows(configurations), markdown)
    lines += ["", "communication per rank per step (gathers and reduce-scatters: counts, "
                  "GiB; all-reduce: bytes)"]
    lines += _table(["mode", "nodes", "gathers", "reduce-scatters", "all-gather",
                     "reduce-scatter", "all-reduce", "total"],
                    _communication_rows(configurations), markdown)
    return "\n".join([*lines, "", _smallest_line(plan)])
