"""Validation of the DeepSpeed JSON, and the config DeepSpeed actually receives.

The JSON a user passes with ``--deepspeed`` describes the run the way they know it
(micro-batch size, gradient accumulation steps, optimizer, precision). NGDiff needs a few
things DeepSpeed must NOT do on its own, so the file is checked here and a derived dict is
handed to ``deepspeed.initialize``:

* ``gradient_accumulation_steps`` K becomes K forget and K retain micro-batches per step that
  the trainer accumulates itself; DeepSpeed gets ``gradient_accumulation_steps: 1`` so every
  ``engine.step()`` is an optimizer step and no backward is rescaled behind our back.
* gradient clipping would rescale the NGDiff direction, a DeepSpeed scheduler would overwrite
  the learning rate we set, fp16 needs a loss scale the direction does not carry, and "auto"
  values are only filled in by the HF Trainer: all are refused with a message naming the key.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from ngdiff_ds.errors import ConfigError

SUPPORTED_OPTIMIZERS = ("AdamW", "Adam", "SGD")


@dataclass(frozen=True)
class BatchLayout:
    """How one step's data is split: per rank, per task."""

    micro_batch_size: int          # examples per forward on one rank
    micro_batches_per_step: int    # K: forget micro-batches (and as many retain) per step
    world_size: int

    @property
    def global_batch_size(self) -> int:
        """Examples of ONE task that enter one step, over all ranks."""
        return self.micro_batch_size * self.micro_batches_per_step * self.world_size


def read_json(path: str | Path) -> dict:
    """Read a JSON object from ``path``; errors name the file and the position."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist")
    def refuse_constant(name: str):
        raise ConfigError(f"DeepSpeed config {path}: {name} is not a number JSON allows; write "
                          "a finite number")

    try:
        value = json.loads(path.read_text(), parse_constant=refuse_constant)
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err.msg} at line "
                          f"{err.lineno} column {err.colno}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return value


def _find_auto_values(value, where: str = "") -> list[str]:
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            found += _find_auto_values(item, f"{where}.{key}" if where else key)
        return found
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _find_auto_values(item, f"{where}[{i}]")]
    return [where] if isinstance(value, str) and value.strip().lower() == "auto" else []


def _positive_int(config: dict, key: str, source: str) -> int | None:
    if key not in config:
        return None
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def validate_ds_config(config: dict, source: str, world_size: int,
                       micro_batch_size: int | None = None,
                       grad_accum_steps: int | None = None) -> BatchLayout:
    """Check a DeepSpeed JSON for NGDiff; return the batch layout it describes.

    ``micro_batch_size`` / ``grad_accum_steps`` are the command-line values (None when not
    given); when given they must agree with the file.
    """
    _check_sections(config, source)
    micro, accum = _batch_sizes(config, source, micro_batch_size, grad_accum_steps)
    layout = BatchLayout(micro, accum, world_size)
    file_total = _positive_int(config, "train_batch_size", source)
    if file_total is not None and file_total != layout.global_batch_size:
        raise ConfigError(
            f"{source}: train_batch_size is {file_total} but train_micro_batch_size_per_gpu "
            f"({layout.micro_batch_size}) x gradient_accumulation_steps "
            f"({layout.micro_batches_per_step}) x world size ({world_size}) = "
            f"{layout.global_batch_size}; fix one of them")
    return layout


def _check_sections(config: dict, source: str) -> None:
    """Everything but the batch sizes: ZeRO stage, clipping, scheduler, precision, optimizer."""
    for section in ("zero_optimization", "fp16", "bf16", "optimizer", "data_types"):
        if section in config and not isinstance(config[section], dict):
            raise ConfigError(f"{source}: \"{section}\" must be a JSON object, got "
                              f"{type(config[section]).__name__}")
    if "optimizer" in config and not isinstance(config["optimizer"].get("params", {}), dict):
        raise ConfigError(f"{source}: optimizer.params must be a JSON object")
    auto = _find_auto_values(config)
    if auto:
        raise ConfigError(f"{source}: \"auto\" is only filled in by the HF Trainer; write numbers "
                          f"for {', '.join(auto)}")
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"{source}: zero_optimization.stage is {stage!r}; ngdiff_ds needs ZeRO "
                          "stage 3 (it reads the partitioned gradients)")
    clipping = config.get("gradient_clipping", 0)
    if clipping not in (0, 0.0, None):
        raise ConfigError(f"{source}: gradient_clipping is {clipping}; set it to 0 — clipping "
                          "would rescale the normalised NGDiff direction")
    if "scheduler" in config:
        raise ConfigError(f"{source}: remove the \"scheduler\" section; the learning rate is set "
                          "by ngdiff_ds every step and a DeepSpeed scheduler would overwrite it")
    if config.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"{source}: fp16.enabled is true; fp16 loss scaling is not supported, "
                          "use bf16 or fp32")
    optimizer = config.get("optimizer")
    if not isinstance(optimizer, dict) or optimizer.get("type") not in SUPPORTED_OPTIMIZERS:
        found = optimizer.get("type") if isinstance(optimizer, dict) else optimizer
        raise ConfigError(f"{source}: optimizer.type must be one of {', '.join(SUPPORTED_OPTIMIZERS)}"
                          f" (got {found!r})")
    lr = optimizer.get("params", {}).get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise ConfigError(f"{source}: optimizer.params.lr must be a positive number, got {lr!r}")


def _batch_sizes(config: dict, source: str, micro_batch_size: int | None,
                 grad_accum_steps: int | None) -> tuple[int, int]:
    """(micro-batch size, micro-batches per step) from the file and the command line."""
    file_micro = _positive_int(config, "train_micro_batch_size_per_gpu", source)
    file_accum = _positive_int(config, "gradient_accumulation_steps", source)
    for name, file_value, cli_value, flag in (
            ("train_micro_batch_size_per_gpu", file_micro, micro_batch_size, "--micro-batch-size"),
            ("gradient_accumulation_steps", file_accum, grad_accum_steps, "--grad-accum-steps")):
        if file_value is not None and cli_value is not None and file_value != cli_value:
            raise ConfigError(f"{source}: {name} is {file_value} but the command line says "
                              f"{flag} {cli_value}; make them agree")
    micro = micro_batch_size or file_micro
    if micro is None:
        raise ConfigError(f"{source}: set train_micro_batch_size_per_gpu (or pass --micro-batch-size)")
    return micro, grad_accum_steps or file_accum or 1


def bf16_supported() -> bool:
    """True on accelerators with native bf16 (Ampere+ CUDA)."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def engine_config(config: dict, layout: BatchLayout, use_bf16: bool | None = None) -> dict:
    """The dict handed to ``deepspeed.initialize`` (the user's file is not modified).

    Precision: an explicit ``bf16`` section is obeyed as written. Without one, bf16 is turned
    on only where the hardware supports it (``use_bf16`` overrides the detection, for tests),
    with fp32 gradient accumulation so the two task gradients are captured in fp32.
    """
    derived = copy.deepcopy(config)
    derived["train_micro_batch_size_per_gpu"] = layout.micro_batch_size
    derived["gradient_accumulation_steps"] = 1  # the trainer accumulates the K micro-batches
    derived["train_batch_size"] = layout.micro_batch_size * layout.world_size
    derived["gradient_clipping"] = 0.0
    if "bf16" not in derived:
        if bf16_supported() if use_bf16 is None else use_bf16:
            derived["bf16"] = {"enabled": True}
    if uses_bf16(derived):
        # Capture both task gradients (and keep the probes' theta_old) in fp32.
        derived.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    # We build nothing ourselves, but a torch optimizer chosen via "torch_adam" or SGD under
    # ZeRO offload is "untested" in DeepSpeed's eyes.
    derived["zero_allow_untested_optimizer"] = True
    if derived.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        derived.setdefault("zero_force_ds_cpu_optimizer", False)
    derived.setdefault("steps_per_print", 10**9)  # our own logging replaces DeepSpeed's
    return derived


def uses_bf16(derived: dict) -> bool:
    return bool(derived.get("bf16", {}).get("enabled", False))


def inference_config(derived: dict) -> dict:
    """An ``engine_config`` result for a frozen model: without an optimizer section DeepSpeed
    builds ZeRO-3's parameter partitioning only (no optimizer state, no gradient buffer)."""
    config = copy.deepcopy(derived)
    for key in ("optimizer", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer"):
        config.pop(key, None)
    config.get("zero_optimization", {}).pop("offload_optimizer", None)
    return config


def layout_for_global_batch(layout: BatchLayout, global_batch: int) -> BatchLayout:
    """``layout`` with as many micro-batches per step as make ``global_batch`` examples per
    task on this world size (a resumed run must keep its checkpoint's global batch).

    The micro-batch size stays (it is what fits in memory); raises ConfigError naming the
    sizes that work when ``global_batch`` is not a multiple of micro-batch x world size.
    """
    if layout.global_batch_size == global_batch:
        return layout
    per_step = layout.micro_batch_size * layout.world_size
    if global_batch % per_step == 0:
        return BatchLayout(layout.micro_batch_size, global_batch // per_step, layout.world_size)
    micro_sizes = [m for m in range(1, global_batch + 1)
                   if global_batch % (m * layout.world_size) == 0]
    worlds = [w for w in range(1, global_batch + 1) if global_batch % (w * layout.micro_batch_size) == 0]
    hint = (f"micro-batch sizes that work on {layout.world_size} rank(s): "
            f"{', '.join(map(str, micro_sizes))}" if micro_sizes
            else f"{layout.world_size} ranks cannot split it evenly")
    raise ConfigError(
        f"the checkpoint's global batch is {global_batch} examples per task, which micro-batches "
        f"of {layout.micro_batch_size} on {layout.world_size} rank(s) cannot make; {hint} "
        f"(--micro-batch-size), or rank counts that work with micro-batch "
        f"{layout.micro_batch_size}: {', '.join(map(str, worlds)) or 'none'}")
