"""Checkpoint bookkeeping without DeepSpeed: completeness, which checkpoint a resume takes,
when the loop checkpoints, the disk-space check, the resumed run log."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from ngdiff_ds.checkpoint import (MANIFEST, Checkpointer, CheckpointSettings, check_complete,
                                  step_directories)
from ngdiff_ds.errors import ConfigError
from ngdiff_ds.run_log import RunLog
from ngdiff_ds.unlearn import check_checkpoint_space


class Log:
    def __init__(self):
        self.lines = []

    def print(self, message):
        self.lines.append(message)


def fake_checkpoint(root, step, complete=True):
    tag = root / f"step{step:06d}"
    tag.mkdir(parents=True)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    (tag / "hf").mkdir()
    (tag / "hf" / "config.json").write_text("{}")
    if complete:
        files = {"zero_pp_rank_0_mp_rank_00_optim_states.pt": 10, "hf/config.json": 2}
        (tag / MANIFEST).write_text(json.dumps({"files": files, "world_size": 1}))
    return tag


def test_completeness_needs_the_manifest_and_matching_files(tmp_path):
    tag = fake_checkpoint(tmp_path, 4)
    assert check_complete(tag) is None
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 3)
    assert "has 3 bytes, the manifest says 10" in check_complete(tag)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    (tag / "hf" / "config.json").unlink()
    assert "hf/config.json is missing" in check_complete(tag)
    assert "no manifest" in check_complete(fake_checkpoint(tmp_path, 8, complete=False))


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 4)
    newest_complete = fake_checkpoint(root, 10)
    torn = fake_checkpoint(root, 12, complete=False)
    assert [p.name for p in step_directories(root)] == ["step000012", "step000010", "step000004"]
    log = Log()
    found = Checkpointer(CheckpointSettings(resume="auto"), tmp_path, log).find_resume()
    assert found == newest_complete
    assert any(str(torn) in line and "no manifest" in line for line in log.lines)
    # a checkpoints directory or a step directory by path
    assert Checkpointer(CheckpointSettings(resume=str(root)), tmp_path / "other",
                        Log()).find_resume() == newest_complete
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        Checkpointer(CheckpointSettings(resume=str(torn)), tmp_path, Log()).find_resume()


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    log = Log()
    assert Checkpointer(CheckpointSettings(resume="auto"), tmp_path, log).find_resume() is None
    assert "starting from step 0" in log.lines[-1]
    assert Checkpointer(CheckpointSettings(), tmp_path, log).find_resume() is None


def test_when_the_loop_checkpoints():
    every_4 = Checkpointer(CheckpointSettings(save_every=4), "out", Log())
    assert [s for s in range(1, 11) if every_4.due(s, 10, evaluated=s == 6)] == [4, 6, 8, 10]
    off = Checkpointer(CheckpointSettings(), "out", Log())
    assert not any(off.due(s, 10, evaluated=True) for s in range(1, 11))
    resume_only = Checkpointer(CheckpointSettings(resume="auto"), "out", Log())
    assert [s for s in range(1, 11) if resume_only.due(s, 10, evaluated=s == 5)] == [5, 10]


def test_disk_too_small_for_one_checkpoint_is_refused(tmp_path, monkeypatch):
    parameter = SimpleNamespace(ds_numel=1_000_000, requires_grad=True)
    frozen = SimpleNamespace(ds_numel=10**9, requires_grad=False)  # not trained: not saved
    built = SimpleNamespace(model=SimpleNamespace(parameters=lambda: [parameter, frozen]))
    usage = namedtuple("usage", "total used free")
    needed = int(1_000_000 * 12 * 1.1)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, needed - 1))
    with pytest.raises(ConfigError, match=r"needs about 0.01 GiB"):
        check_checkpoint_space(built, CheckpointSettings(save_every=5), str(tmp_path / "out"))
    check_checkpoint_space(built, CheckpointSettings(), str(tmp_path / "out"))  # no checkpoints
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, needed))
    check_checkpoint_space(built, CheckpointSettings(save_every=5), str(tmp_path / "out"))


def test_resumed_log_keeps_the_checkpointed_rows_only(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)
    for step in range(5):
        log.record("train", step, {"loss": float(step)})
    log.close()
    resumed = RunLog(tmp_path, tensorboard=False)
    resumed.resume(rows=3, purge_step=3)
    resumed.record("train", 3, {"loss": 30.0})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    assert resumed.rows_written == 4


def test_rng_states_round_trip():
    from ngdiff_ds.checkpoint import _rng_state, _set_rng_state

    state = _rng_state()
    expected = torch.rand(3)
    torch.rand(5)
    _set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


def test_another_rank_count_needs_adam_state(tmp_path):
    tag = fake_checkpoint(tmp_path / "checkpoints", 4)
    with pytest.raises(ConfigError, match="knows Adam/AdamW state only.*SGD"):
        Checkpointer(CheckpointSettings(resume="auto"), tmp_path, Log()).to_universal(tag, "SGD")
