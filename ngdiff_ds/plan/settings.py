"""The plan's settings (the flags of launch/plan.py), what it assumes of DeepSpeed, and the
constants of the step it counts."""

from __future__ import annotations

from dataclasses import dataclass

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.plan.model import (LORA_TARGETS, PRESETS, ModelDims, Tensor, dims_from_config,
                                  frozen, lora_tensors, model_tensors)
from ngdiff_ds.settings import invalid, option

MODES = ("ngdiff", "ngdiff_adaptive", "shared_forward", "gdiff")
PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes per element of the model dtype

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
    reference_model: bool = option(False, help="a frozen copy of the starting model beside "
                                               "the trained one, as the KL retaining loss "
                                               "keeps (--retain-loss kl, --method gdiff_kl)")
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
        tensors = frozen(tensors) + lora_tensors(dims, settings.lora_rank, settings.lora_targets)
    return dims, tensors
