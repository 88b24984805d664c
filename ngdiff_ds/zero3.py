"""The one module that touches DeepSpeed ZeRO-3 internals.

Everything NGDiff needs from inside DeepSpeed's stage-3 optimizer lives here, behind small
functions, so that the rest of the package sees plain tensors. Each private attribute we rely
on is named in the comment where it is used; they are checked once at start-up by
``ZeroPartitions.__init__`` so that an untested DeepSpeed version fails with a clear message
instead of a silent wrong answer.

Facts this module relies on (checked with deepspeed 0.19.x, see docs/design.md):

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

from ngdiff_ds.errors import UnsupportedDeepSpeed

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
    "persistent_parameters",               # small params kept gathered; re-gathered after edits
)


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers)


def skip_cpu_shared_memory_allreduce() -> None:
    """On the CPU accelerator, keep DeepSpeed from building and starting its shared-memory
    all-reduce (op ``deepspeed_shm_comm``); call before ``deepspeed.init_distributed``.

    ``comm.torch.TorchBackend.__init__`` builds that op whenever
    ``deepspeed.ops.__compatible_ops__`` (a dict computed once per process, which DeepSpeed
    keeps so that edits persist) marks it compatible, and each rank then creates a 66 MB
    ``/dev/shm/deepspeed_allreduce_buffer_*`` segment that nothing ever unlinks (its
    ``shared_close`` has no caller): every CPU job leaks it, until ``/dev/shm`` fills the
    machine's memory. Only ``inference_all_reduce`` (tensor-parallel inference) uses it;
    ZeRO-3 training and our collectives go through ``torch.distributed``. Skipping it also
    saves the op's first-time compile (minutes on a small CPU).
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


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
        if getattr(optimizer, "swap_optimizer", False):
            raise UnsupportedDeepSpeed(
                "optimizer state offloaded to NVMe is not supported (offload_optimizer.device "
                "must be 'cpu' or 'none'): the fp32 master is not resident between steps")
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
        self._probe_source = None  # what end_probes restores from; set by begin_probes

    # ----- gradients -------------------------------------------------------------------
    @property
    def flat_grad(self) -> torch.Tensor:
        """This rank's gradient slice of all trainable parameters (a live buffer)."""
        return self.optimizer.grad_partitions_flat_buffer.narrow(0, 0, self.numel)

    @torch.no_grad()
    def reset_grads(self) -> None:
        """Start a fresh accumulation: the next backward overwrites, absent grads read 0.

        ``optimizer.zero_grad()`` sets ``micro_step_id`` to 0 so the next backward copies into
        the buffer instead of adding. A parameter that receives no gradient in a task would
        keep the previous task's slice, so the buffer itself is zeroed too.
        """
        self.optimizer.zero_grad()
        self.flat_grad.zero_()

    @torch.no_grad()
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

    @torch.no_grad()
    def separate_step_counters(self) -> None:
        """Give every sub-group its own optimizer ``step`` tensor.

        DeepSpeed's universal-checkpoint loader for stage 3 puts ONE ``step`` tensor object
        into the torch optimizer's state of every sub-group
        (``optimizer.optimizer.state[fp32_partitioned_groups_flat[i]]``); torch's Adam adds 1
        to it in place once per sub-group, so with n sub-groups it would count n per step.
        """
        state = self.optimizer.optimizer.state
        for flat in self.optimizer.fp32_partitioned_groups_flat:
            if torch.is_tensor(state.get(flat, {}).get("step")):
                state[flat]["step"] = state[flat]["step"].clone()

    # ----- weights (for the learning-rate probes) --------------------------------------
    @property
    def master_weights(self) -> list[torch.Tensor]:
        """fp32 master slices, one per sub-group (updated by the optimizer)."""
        return list(self.optimizer.fp32_partitioned_groups_flat)

    @property
    def forward_weights(self) -> list[torch.Tensor]:
        """Low-precision slices the forward gathers from (``param.ds_tensor`` views)."""
        return list(self.optimizer.fp16_partitioned_groups_flat)

    def _forward_aliases_master(self) -> bool:
        # In fp32 without offload DeepSpeed uses one tensor for both (stage3.py: "autocast ...
        # aliases"); editing the forward weights then edits the master too.
        return any(f.data_ptr() == m.data_ptr()
                   for f, m in zip(self.forward_weights, self.master_weights))

    @torch.no_grad()
    def copy_master_to(self, out: torch.Tensor) -> None:
        """Copy this rank's fp32 master slices into the flat tensor ``out``."""
        for chunk, master in zip(out.narrow(0, 0, self.numel).split(self.group_numels),
                                 self.master_weights):
            chunk.copy_(master)

    @torch.no_grad()
    def subtract_from_master(self, inout: torch.Tensor) -> None:
        """``inout <- master - inout`` in place (turns theta_old into the step just taken)."""
        inout.neg_()
        for chunk, master in zip(inout.narrow(0, 0, self.numel).split(self.group_numels),
                                 self.master_weights):
            chunk.add_(master)

    @torch.no_grad()
    def begin_probes(self) -> None:
        """Remember the current weights so ``end_probes`` can restore them bit for bit.

        Between steps the forward weights are exactly the cast of the master, so the master
        is the backup — unless the two are one tensor (fp32), in which case the current
        weights are copied into the gradient partition, free until the next backward.
        """
        self._probe_source = self.master_weights
        if self._forward_aliases_master():
            if self.flat_grad.dtype != self.master_weights[0].dtype:
                raise UnsupportedDeepSpeed("gradient buffer dtype differs from aliased weights")
            self.copy_master_to(self.flat_grad)
            self._probe_source = list(self.flat_grad.split(self.group_numels))

    def perturb_weights(self, step_delta: torch.Tensor, scale: float) -> None:
        """Forward weights <- current weights + ``scale`` * ``step_delta`` (flat, this rank)."""
        self._write_forward_weights(step_delta if scale != 0 else None, scale)

    @torch.no_grad()
    def shorten_step(self, step_delta: torch.Tensor, multiple: float) -> None:
        """Weights (master and forward) <- theta_old + ``multiple`` * delta: the step just
        taken, retaken at ``multiple`` times its rate. Exact for the optimizers used here
        (SGD with momentum, Adam/AdamW with decoupled decay): their step is linear in the rate,
        and their moments and step counts do not depend on it, so nothing else changes."""
        for chunk, master in zip(step_delta.narrow(0, 0, self.numel).split(self.group_numels),
                                 self.master_weights):
            master.add_(chunk.to(master.device, master.dtype), alpha=multiple - 1.0)
        self._probe_source = self.master_weights  # the forward weights are re-cast from it
        self._write_forward_weights(None, 0.0)
        self._probe_source = None

    def end_probes(self) -> None:
        """Restore the weights saved by ``begin_probes`` exactly."""
        self._write_forward_weights(None, 0.0)
        self._probe_source = None

    @torch.no_grad()
    def _write_forward_weights(self, offset: torch.Tensor | None, scale: float) -> None:
        # The forward only gathers parameters that are not resident: release them all so the
        # next forward reads the edited partitions (optimizer._partition_all_parameters).
        self.optimizer._partition_all_parameters()
        offsets = (offset.narrow(0, 0, self.numel).split(self.group_numels) if offset is not None
                   else [None] * len(self.group_numels))
        for forward, source, chunk in zip(self.forward_weights, self._probe_source, offsets):
            if chunk is None:
                forward.copy_(source)
            elif source.dtype == forward.dtype and source.device == forward.device:
                torch.add(source, chunk, alpha=scale, out=forward)
            else:
                # master and forward weights on different devices (offload) or dtypes (bf16)
                forward.copy_(torch.add(source, chunk.to(source.device, source.dtype), alpha=scale))
        # Parameters below stage3_param_persistence_threshold are never released; they are
        # re-gathered from their partitions as DeepSpeed's own _post_step does
        # (optimizer.persistent_parameters, ds_tensor.all_gather).
        persistent = self.optimizer.persistent_parameters
        if len(persistent) > 0:
            persistent[0].all_gather(persistent)
        if hasattr(self.optimizer, "invalidate_secondary_tensor"):
            self.optimizer.invalidate_secondary_tensor()  # ZeRO++ hpZ copies are now stale


def consolidated_state_dict(engine) -> dict | None:
    """The full model state dict on rank 0 (None elsewhere); all ranks must call this.

    Uses the private ``engine._zero3_consolidated_16bit_state_dict``, which gathers one module
    at a time so no rank ever holds more than one layer beyond its partition.
    """
    return engine._zero3_consolidated_16bit_state_dict()
