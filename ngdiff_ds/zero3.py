"""The one module that touches DeepSpeed ZeRO-3 internals.

Everything NGDiff needs from inside DeepSpeed's stage-3 optimizer lives here, behind small
functions, so that the rest of the package sees plain tensors. Each private attribute we rely
on is named in the comment where it is used; they are checked once at start-up by
``ZeroPartitions.__init__`` so that an untested DeepSpeed version fails with a clear message
instead of a silent wrong answer.

Facts this module relies on (checked with deepspeed 0.19.x, see ``shared/design.md``):

* After a backward, this rank's averaged gradient slice of every trainable parameter sits in
  ONE flat tensor, ``optimizer.grad_partitions_flat_buffer``. Split by
  ``optimizer.fp16_partitioned_groups_flat_numel`` its chunk i lines up element for element
  with the fp32 master ``optimizer.fp32_partitioned_groups_flat[i]`` and with the weights the
  forward gathers from, ``optimizer.fp16_partitioned_groups_flat[i]``.
* A backward overwrites that buffer only when ``optimizer.micro_step_id == 0`` and adds to it
  otherwise; ``optimizer.zero_grad()`` resets the counter (``engine.zero_grad()`` does not).
* With the optimizer offloaded to CPU, ``step()`` reads ``fp32_partitioned_groups_flat[i].grad``
  instead of the flat buffer, so the direction is copied there too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# The range of DeepSpeed versions whose stage-3 internals this module was checked against.
TESTED_DEEPSPEED_MIN = (0, 19, 0)
TESTED_DEEPSPEED_BELOW = (0, 20, 0)

# Private attributes of deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3 we use.
_REQUIRED_OPTIMIZER_ATTRIBUTES = (
    "grad_partitions_flat_buffer",        # flat gradient slice of this rank (all sub-groups)
    "fp16_partitioned_groups_flat_numel",  # numel of each sub-group's slice
    "fp16_partitioned_groups_flat",        # low-precision weight slices the forward gathers
    "fp32_partitioned_groups_flat",        # fp32 master weight slices the optimizer updates
    "dp_process_group",                    # the data-parallel group gradients are averaged over
    "micro_step_id",                       # overwrite-vs-accumulate switch of the grad buffer
    "offload_optimizer",                   # True when step() reads the fp32 .grad on CPU
    "_partition_all_parameters",           # releases gathered weights back to partitions
)


class UnsupportedDeepSpeed(RuntimeError):
    """DeepSpeed version or configuration that this engine was not checked against."""


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers)


def check_deepspeed_version(version: str | None = None) -> None:
    """Refuse a DeepSpeed outside the tested range: we read its private stage-3 state."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    found = _version_tuple(version)
    if not (TESTED_DEEPSPEED_MIN <= found < TESTED_DEEPSPEED_BELOW):
        low = ".".join(map(str, TESTED_DEEPSPEED_MIN))
        high = ".".join(map(str, TESTED_DEEPSPEED_BELOW))
        raise UnsupportedDeepSpeed(
            f"deepspeed {version} is installed, but ngdiff_ds reads ZeRO-3 internals that were "
            f"checked only for deepspeed >={low},<{high}; install a version in that range"
        )


class ZeroPartitions:
    """This rank's slice of the gradients and weights of a ZeRO-3 engine, as flat tensors."""

    def __init__(self, engine):
        check_deepspeed_version()
        if engine.zero_optimization_stage() != 3:
            raise UnsupportedDeepSpeed(
                f"zero_optimization.stage is {engine.zero_optimization_stage()}; ngdiff_ds needs 3"
            )
        optimizer = engine.optimizer
        missing = [name for name in _REQUIRED_OPTIMIZER_ATTRIBUTES if not hasattr(optimizer, name)]
        if missing:
            raise UnsupportedDeepSpeed(
                f"the ZeRO-3 optimizer {type(optimizer).__name__} lacks {missing}: "
                "this DeepSpeed build is not one ngdiff_ds was checked against"
            )
        if any(t is None for t in optimizer.fp16_partitioned_groups_flat):
            raise UnsupportedDeepSpeed(
                "parameters offloaded to NVMe are not supported (offload_param.device must be "
                "'cpu' or 'none')"
            )
        self.engine = engine
        self.optimizer = optimizer
        # Sizes of the sub-groups in the order the flat buffer stores them.
        self.group_numels = [int(n) for n in optimizer.fp16_partitioned_groups_flat_numel]
        self.numel = sum(self.group_numels)

    # ----- gradients -------------------------------------------------------------------
    @property
    def flat_grad(self) -> torch.Tensor:
        """This rank's gradient slice of all trainable parameters (a live buffer)."""
        return self.optimizer.grad_partitions_flat_buffer.narrow(0, 0, self.numel)

    def reset_grads(self) -> None:
        """Start a fresh accumulation: the next backward overwrites, absent grads read 0.

        ``optimizer.zero_grad()`` sets ``micro_step_id`` to 0 so the next backward copies into
        the buffer instead of adding. A parameter that receives no gradient in a task would
        keep the previous task's slice, so the buffer itself is zeroed too.
        """
        self.optimizer.zero_grad()
        self.flat_grad.zero_()

    def commit_direction(self) -> None:
        """Make ``step()`` use what is now in the flat buffer as the gradient.

        Without offload, step() flattens views of the flat buffer (``averaged_gradients``),
        so there is nothing to do. With the optimizer on CPU, step() reads
        ``fp32_partitioned_groups_flat[i].grad``, which the last backward filled with the
        retain gradient: overwrite it with the direction.
        """
        if not self.optimizer.offload_optimizer:
            return
        for master, chunk in zip(self.optimizer.fp32_partitioned_groups_flat,
                                 self.flat_grad.split(self.group_numels)):
            master.grad.copy_(chunk, non_blocking=False)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` in place over the data-parallel group.

        The slices of the gradient are disjoint across the ranks of ``dp_process_group`` and
        together cover every trainable parameter once, so summing the per-rank partial sums
        over exactly this group gives the global sums.
        """
        if dist.is_initialized() and dist.get_world_size(self.optimizer.dp_process_group) > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.optimizer.dp_process_group)

    # ----- weights ---------------------------------------------------------------------
    @property
    def master_weights(self) -> list[torch.Tensor]:
        """fp32 master slices, one per sub-group (updated by the optimizer)."""
        return list(self.optimizer.fp32_partitioned_groups_flat)

    @property
    def forward_weights(self) -> list[torch.Tensor]:
        """Low-precision slices the forward gathers from (``param.ds_tensor`` views)."""
        return list(self.optimizer.fp16_partitioned_groups_flat)

    def release_gathered_weights(self) -> None:
        """Put every gathered parameter back to its partition.

        The forward only gathers parameters that are not already resident, so before and
        after editing the partitions everything must be released or a forward silently
        reads stale full weights.
        """
        self.optimizer._partition_all_parameters()

    def copy_master_to(self, out: torch.Tensor) -> torch.Tensor:
        """Copy this rank's fp32 master slices into the flat tensor ``out``."""
        for chunk, master in zip(out.narrow(0, 0, self.numel).split(self.group_numels),
                                 self.master_weights):
            chunk.copy_(master)
        return out

    def set_forward_weights(self, offset_direction: torch.Tensor | None, scale: float) -> None:
        """Forward weights <- master + scale * offset_direction (None: the master itself).

        Restoring with ``offset_direction=None`` is bit-exact: between steps the
        low-precision weights are exactly the cast of the fp32 master.
        """
        self.release_gathered_weights()
        chunks = (offset_direction.narrow(0, 0, self.numel).split(self.group_numels)
                  if offset_direction is not None else [None] * len(self.group_numels))
        for forward, master, offset in zip(self.forward_weights, self.master_weights, chunks):
            if offset is None:
                forward.copy_(master)
            else:
                forward.copy_(master.to(torch.float32) + scale * offset.to(torch.float32))


def consolidated_state_dict(engine) -> dict | None:
    """The full model state dict on rank 0 (None elsewhere); all ranks must call this.

    Uses the private ``engine._zero3_consolidated_16bit_state_dict``, which gathers one module
    at a time so no rank ever holds more than one layer beyond its partition.
    """
    return engine._zero3_consolidated_16bit_state_dict()
