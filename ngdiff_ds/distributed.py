"""The process group: joining it, and this process's place in it.

Every rank-dependent piece of the package (which examples a rank scores, which rank writes
files) asks ``rank_and_world_size()`` instead of having the numbers passed through its
signature. The package runs pure data parallelism, so the default group is the
data-parallel group.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Join the process group the launcher set up; return (rank, world size).

    The timeout bounds how long a collective may wait for a dead or stuck peer before the
    whole job fails, instead of hanging until the cluster's wall-clock limit.
    """
    import deepspeed

    from ngdiff_ds.zero3 import check_deepspeed_version

    check_deepspeed_version()
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes), verbose=False)
    _share_cpu_threads()
    return rank_and_world_size()


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world_size()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _share_cpu_threads() -> None:
    """On CPU, give each local rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    torch defaults every process to all cores, so N ranks on one host oversubscribe them N
    times; on 2 cores with 2 ranks that cost about 25 % of the step time here.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))
