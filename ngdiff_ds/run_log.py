"""Per-step metrics to stdout, a JSONL file and TensorBoard — written by rank 0 only."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class RunLog:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    On ranks other than 0 every method is a no-op, so callers need no rank checks. Files are
    opened at the first record, so a run refused at start-up leaves no output directory.
    """

    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        from ngdiff_ds.distributed import is_main_process

        self.enabled = is_main_process()
        self.out_dir = Path(out_dir)
        self.tensorboard = tensorboard
        self._jsonl = None
        self._writer = None

    def _open(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "w", buffering=1)  # one run per file
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def record(self, kind: str, step: int, values: dict) -> None:
        """Write ``values`` for ``step``; numeric entries also go to TensorBoard as kind/name."""
        if not self.enabled:
            return
        if self._jsonl is None:
            self._open()
        row = {"kind": kind, "step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(f"{kind}/{name}", value, step)

    def print(self, message: str) -> None:
        """A line on stdout that does not break a tqdm bar."""
        if not self.enabled:
            return
        try:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            print(message, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
