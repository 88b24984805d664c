"""Preemption: SIGTERM or SIGUSR1 (Slurm's ``--signal``) asks the run to stop at the next step
boundary with a checkpoint.

The handler only sets a flag, so a second signal during the save changes nothing. The signal
reaches the ranks at different times, so no rank acts on its own flag: each step's one
all-reduce carries every rank's vote (trainer.ngdiff_step), and all ranks stop after the same
step. The run then exits with ``errors.EXIT_PREEMPTED``, which job scripts use to requeue.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_requested = False


def _on_signal(signum, frame) -> None:
    global _requested
    _requested = True


def install() -> None:
    """Catch the preemption signals in this process (the main thread)."""
    global _requested
    _requested = False
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)


def requested() -> bool:
    """Whether this process got a preemption signal since ``install``."""
    return _requested
