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
        self.rows_written = 0  # rows of metrics.jsonl so far (a checkpoint records it)
        self._jsonl = None
        self._writer = None

    def _open(self, mode: str = "w", purge_step: int | None = None) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", mode, buffering=1)  # one run per file
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"),
                                         purge_step=purge_step)

    def resume(self, rows: int, purge_step: int) -> None:
        """Continue the files of a resumed run: keep the first ``rows`` rows of metrics.jsonl
        (those the checkpoint had seen; later ones are written again), and have TensorBoard
        hide the old events at steps >= ``purge_step``, re-adding the kept rows at those steps.
        """
        self.rows_written = rows
        if not self.enabled:
            return
        path = self.out_dir / "metrics.jsonl"
        kept = path.read_text().splitlines()[:rows] if path.is_file() else []
        if len(kept) < rows:
            self.print(f"warning: {path} has {len(kept)} rows, the checkpoint saw {rows}; "
                       "the run's log continues from what is there")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(".metrics.jsonl.tmp")
        staging.write_text("".join(line + "\n" for line in kept))
        staging.replace(path)
        self._open("a", purge_step=purge_step)
        for row in map(json.loads, kept):
            if row["step"] >= purge_step:
                values = {k: v for k, v in row.items() if k not in ("kind", "step")}
                self._add_scalars(row["kind"], row["step"], values)

    def record(self, kind: str, step: int, values: dict) -> None:
        """Write ``values`` for ``step``; numeric entries also go to TensorBoard as kind/name."""
        self.rows_written += 1
        if not self.enabled:
            return
        if self._jsonl is None:
            self._open()
        row = {"kind": kind, "step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._add_scalars(kind, step, values)

    def _add_scalars(self, kind: str, step: int, values: dict) -> None:
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
