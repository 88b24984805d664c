"""Make a checkpoint write slow or stop half-way, so that a test can signal or kill a job while
it writes (test_resume.py); loaded with ``--plugin tests/plugin_slow_save.py``.

It acts only while ``$SLOW_SAVE_DIR/arm`` exists, so the same command line resumes normally
once the test removes that file. ``arm`` holds one line:

    hang TAG   every rank writing its optimizer-state file of checkpoint TAG writes half of
               it, creates ``$SLOW_SAVE_DIR/in_save``, and sleeps until it is killed
    pause S    the first file each rank writes sleeps S seconds first (after creating
               ``in_save``), then is written normally

It wraps DeepSpeed's ``TorchCheckpointEngine.save(state_dict, path)``, the one call through
which ``save_checkpoint`` writes each file.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

_CONTROL = Path(os.environ["SLOW_SAVE_DIR"])
_original_save = TorchCheckpointEngine.save
_paused = False


def _save(self, state_dict, path: str):
    global _paused
    arm = _CONTROL / "arm"
    if arm.is_file():
        mode, argument = arm.read_text().split()
        if mode == "hang" and argument in str(path) and "optim_states" in str(path):
            buffer = io.BytesIO()
            torch.save(state_dict, buffer)
            Path(path).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
            (_CONTROL / "in_save").touch()
            while True:
                time.sleep(1)
        if mode == "pause" and not _paused:
            _paused = True
            (_CONTROL / "in_save").touch()
            time.sleep(float(argument))
    return _original_save(self, state_dict, path)


TorchCheckpointEngine.save = _save
