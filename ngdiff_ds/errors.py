"""Bad input: the one family of errors a launch script turns into exit code 2 and one line.

Everything a user can get wrong (a flag, the DeepSpeed JSON, a data file, a model path, an
untested DeepSpeed) raises a subclass of ``BadInput`` with a message that names the file,
field or setting. ``exit_on_bad_input`` is the only place that catches them; any other
exception (a ``ValueError`` from a bug included) keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

# Exit codes, documented in the README.
EXIT_BAD_INPUT = 2   # refused before or while starting: nothing trained
EXIT_DIVERGED = 3    # too many consecutive steps with a zero or non-finite gradient norm
EXIT_PREEMPTED = 75  # stopped on SIGTERM/SIGUSR1 after writing a checkpoint: requeue and resume


class BadInput(Exception):
    """Input the run refuses; the message is the whole explanation a user sees."""


class ConfigError(BadInput):
    """A setting in the DeepSpeed JSON or on the command line that this run refuses."""


class DataError(BadInput):
    """Bad user data; the message names the file or split and the field or record."""


class SplitNotFound(DataError):
    """The split is not there (no such file, path or loadable hub dataset), as opposed to
    there but malformed: optional evaluation sets are skipped on this one only."""


class MissingField(DataError):
    """A record lacks a required field (``field`` names it)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class ModelError(BadInput):
    """The model named on the command line cannot be loaded."""


class UnsupportedDeepSpeed(BadInput):
    """A DeepSpeed version or configuration this engine was not checked against."""


class TrainingDiverged(RuntimeError):
    """The run stopped itself: its gradients stayed zero or non-finite."""


class Preempted(Exception):
    """The run stopped on a preemption signal, after writing a checkpoint."""


def launcher_rank() -> int:
    """This process's rank before the process group exists (launchers export one of these)."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


@contextmanager
def exit_on_bad_input():
    """Turn a ``BadInput`` into ``error: <message>`` on rank 0's stderr and exit code 2, a
    ``TrainingDiverged`` into its message and exit code 3, a ``Preempted`` into exit code 75;
    nothing else is caught.

    Every rank runs the same checks on the same input, so every rank exits; only rank 0
    prints, so the message appears once.
    """
    try:
        yield
    except BadInput as error:
        _print_once(error)
        sys.exit(EXIT_BAD_INPUT)
    except TrainingDiverged as error:
        _print_once(error)
        sys.exit(EXIT_DIVERGED)
    except Preempted as error:
        if launcher_rank() == 0:
            print(f"preempted: {error}", file=sys.stderr, flush=True)
        exit_past_teardown(EXIT_PREEMPTED)


def exit_past_teardown(code: int = 0) -> None:
    """End a run that finished in step with every rank (done, or preempted after its
    checkpoint) with ``code`` now, skipping interpreter teardown.

    The launchers call ``distributed.leave_distributed`` first, but DeepSpeed's engine and
    comm module keep references to the group objects (and torch shuts only NCCL backends down
    explicitly), so gloo's C++ process group can still be destroyed during teardown, where
    its threads may outlive it: "terminate called without an active exception", exit -6,
    after the work was done (seen in CI under the deepspeed launcher on two "nodes" and
    under mpirun, about once in two full runs); for a preempted job that would also turn
    the requeue code 75 into a failure. Everything a run writes is closed before this is
    called; stdio is flushed here, and under mpirun MPI is finalised first, as mpi4py's
    own exit handler would have done.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


def _print_once(error: Exception) -> None:
    if launcher_rank() == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
