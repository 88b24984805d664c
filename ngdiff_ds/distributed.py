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

from ngdiff_ds.errors import ConfigError

DEFAULT_PORT = 29500  # DeepSpeed's, torchrun's and MPI discovery's
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
_MPI_RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Join the process group the launcher set up; return (rank, world size).

    The timeout bounds how long a collective may wait for a dead or stuck peer before the
    whole job fails, instead of hanging until the cluster's wall-clock limit. A rendezvous
    port held by another process is a ``ConfigError`` that says how to pick another.
    """
    import deepspeed

    from ngdiff_ds.zero3 import check_deepspeed_version, skip_cpu_shared_memory_allreduce

    check_deepspeed_version()
    skip_cpu_shared_memory_allreduce()
    # DeepSpeed's MPI discovery (plain mpirun) overwrites MASTER_PORT with its own default:
    # hand it the user's, so that MASTER_PORT=N works under mpirun too.
    port = int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT", "").isdigit() \
        else DEFAULT_PORT
    if _discovers_ranks_through_mpi():
        _refuse_busy_port_on_every_mpi_rank(port)
    try:
        deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes), verbose=False,
                                   distributed_port=port)
    except RuntimeError as error:
        if _port_in_use(error):
            address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', port)}"
            raise ConfigError(_port_in_use_message(address)) from None
        raise
    _share_cpu_threads()
    return rank_and_world_size()


def _port_in_use(error: RuntimeError) -> bool:
    """Rank 0 could not listen on the rendezvous port: another process holds it.

    torch raises this at once (no retry) from the TCPStore server, which only rank 0 starts.
    The other ranks connect to whatever holds the port and, when it accepts connections,
    wait with no timeout: the deepspeed launcher and ``srun --kill-on-bad-exit`` end them
    when rank 0 exits (docs/cluster.md).
    """
    network_error = getattr(dist, "DistNetworkError", RuntimeError)
    text = str(error)
    return isinstance(error, network_error) and ("EADDRINUSE" in text
                                                  or "Address already in use" in text)


def _discovers_ranks_through_mpi() -> bool:
    """Started by mpirun without a launcher's variables: DeepSpeed will ask mpi4py."""
    return (not all(name in os.environ for name in _LAUNCHER_VARIABLES)
            and any(name in os.environ for name in _MPI_RANK_VARIABLES))


def _refuse_busy_port_on_every_mpi_rank(port: int) -> None:
    """Under mpirun, rank 0 tries the port and tells every rank, so that they all exit 2 by
    themselves. Otherwise the other ranks would hang connecting to the port's holder, and
    mpi4py's MPI_Finalize at rank 0's exit would wait for them forever; killing them instead
    may catch one inside the load of DeepSpeed's CPU extension, whose build lock it then
    leaves behind for every later run to wait on."""
    try:
        from mpi4py import MPI
    except ImportError:  # DeepSpeed's discovery reports it
        return
    comm = MPI.COMM_WORLD
    busy = _port_taken(port) if comm.Get_rank() == 0 else None
    if comm.bcast(busy, root=0):
        raise ConfigError(_port_in_use_message(f"{port} on rank 0's node"))


def _port_taken(port: int) -> bool:
    """Whether the TCPStore server could not listen on ``port``: it tries [::] then
    0.0.0.0, with address reuse, and fails only when both are in use."""
    import errno
    import socket

    families = [socket.AF_INET] + ([socket.AF_INET6] if socket.has_ipv6 else [])
    for family in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
                return False
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                return False  # not ours to judge (no IPv6, ...): let torch try
    return True


def _port_in_use_message(where: str) -> str:
    return (f"the rendezvous port {where} is already in use by another process (another "
            f"job on this node?); pick a free one: `deepspeed --master_port N ...`, "
            f"`torchrun --master_port N ...`, MASTER_PORT=N for python or mpirun, "
            f"NGDIFF_MASTER_PORT=N for launch/slurm; see docs/cluster.md")


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


def rank0_decides(value):
    """Rank 0's ``value`` on every rank: a decision that leads into a collective (a save
    that gathers the weights) must be the same everywhere, not recomputed per rank from
    floats that could differ in the last bit. A broadcast from rank 0 over all ranks."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def leave_distributed() -> None:
    """End a successful run: wait for every rank, then tear the process group down.

    Without this the group is destroyed during interpreter shutdown, where gloo's worker
    threads can outlive it: the process then aborts ("terminate called without an active
    exception", exit -6) after its work is done, and the launcher reports a failed job.
    The barrier (over every rank) keeps a rank that finished early from tearing down while
    another still runs a collective. Only for the success path: on an error a peer may be
    stuck in a collective, and the launcher ends the job anyway.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
