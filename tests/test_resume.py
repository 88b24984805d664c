"""Checkpoints and exact resume through the real CLI on 2 ranks (AdamW, adaptive rate on).

The reference is the same command run without interruption. A run killed by SIGKILL while it
writes a checkpoint, and a run stopped by SIGTERM (signalled again during its save), each
continued with ``--resume auto``, must write the same per-step rows (timings aside) and
bit-identical final weights; tests/plugin_slow_save.py holds the write open. The adaptive
rate fits after steps 1 and 9, so one fit lies after every resume point. The method is
``ngdiff_npo``: NPO's reference log-probabilities, scored on the starting model, must come
back from the checkpoint (scored again on the resumed weights, every later step would differ).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DEEPSPEED, REPO, cpu_env, free_port

pytestmark = pytest.mark.slow  # multi-rank DeepSpeed launches

STEPS = 12
CONFIG = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True,
                                                    "weight_decay": 0.01}}}
TIMINGS = {"step_time", "tokens_per_s", "probe_time"}


def _command(tmp_path, tiny_assets, out, *extra):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(CONFIG))
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launch/unlearn.py",
            "--deepspeed", str(config), "--model", tiny_assets["model"], "--data",
            tiny_assets["data"], "--output-dir", str(out), "--max-steps", str(STEPS),
            "--max-length", "64", "--save-every", "4", "--resume", "auto", "--eval-every", "6",
            "--eval-retain-size", "4", "--max-new-tokens", "4", "--verbmem-max-new-tokens", "4",
            "--eval-batch-size", "8", "--method", "ngdiff_npo", *extra]


def _run(command, timeout=600, **env):
    return subprocess.run(command, cwd=REPO, env=cpu_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def _start(command, **env):
    return subprocess.Popen(command, cwd=REPO, env=cpu_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_checkpoint(out, process, tag="step000004", timeout=300):
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if latest.is_file() and latest.read_text().strip() >= tag:
            return
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint {tag} within {timeout} s")


def _rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def _assert_same_run(out, reference):
    rows, expected = _rows(out), _rows(reference)
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(STEPS))
    assert any(r["kind"] == "lr_fit" and r["step"] == 8 for r in rows), "no fit after the resume"
    assert rows == expected
    weights = load_file(str(out / "model" / "model.safetensors"))
    expected_weights = load_file(str(reference / "model" / "model.safetensors"))
    assert weights.keys() == expected_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], expected_weights[name]), name
    for name in ("step6_summary.json", "final_summary.json"):
        assert (out / "eval" / name).read_text() == (reference / "eval" / name).read_text()


@pytest.fixture(scope="module")
def uninterrupted(tiny_assets, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("whole")
    out = tmp_path / "out"
    command = _command(tmp_path, tiny_assets, out)
    result = _run(command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, command[command.index("--master_port") + 1]


def test_a_finished_job_leaves_no_shared_memory_behind(uninterrupted):
    """DeepSpeed's CPU shared-memory all-reduce (66 MB of /dev/shm per rank, never unlinked)
    is not started: a suite of jobs would otherwise fill the machine's memory."""
    _, port = uninterrupted
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_checkpoints_are_deepspeed_layout_and_pruned(uninterrupted):
    root = uninterrupted[0] / "checkpoints"
    # --keep-last 2 of step 4, 6 (evaluation), 8, 12 (save-every and the end)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step000008", "step000012"]
    assert (root / "latest").read_text() == "step000012"
    newest = root / "step000012"
    # under ZeRO-3 every rank writes its model states (with the client state) and its
    # partition of the fp32 weights and optimizer state
    assert len(list(newest.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))) == 2
    assert len(list(newest.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == 2
    assert (newest / "hf" / "config.json").is_file() and (newest / "ngdiff_checkpoint.json").is_file()


def _wait_for_file(path, process, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"no {path} within {timeout} s"
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.1)


def test_sigkill_during_a_checkpoint_write_then_resume_auto_is_bit_identical(
        tiny_assets, tmp_path, uninterrupted):
    out, control = tmp_path / "out", tmp_path / "control"
    control.mkdir()
    # Both ranks stop half-way through their optimizer-state file of step 8 (4 and 6 are
    # complete): the kill lands during a real checkpoint write.
    (control / "arm").write_text("hang step000008")
    command = _command(tmp_path, tiny_assets, out, "--plugin", "tests/plugin_slow_save.py")
    process = _start(command, SLOW_SAVE_DIR=control)
    _wait_for_file(control / "in_save", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    checkpoints = out / "checkpoints"
    torn = checkpoints / "step000008"
    assert sorted(torn.glob("*optim_states.pt")) and not (torn / "ngdiff_checkpoint.json").exists()
    assert (checkpoints / "latest").read_text() == "step000006"
    (control / "arm").unlink()
    result = _run(command, SLOW_SAVE_DIR=control)  # the same command line, as on a requeue
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"skipping checkpoint {torn}: no manifest" in result.stdout
    assert f"resumed from checkpoint {checkpoints / 'step000006'}" in result.stdout
    _assert_same_run(out, uninterrupted[0])


def test_sigterm_checkpoints_exits_75_and_resumes(tiny_assets, tmp_path, uninterrupted):
    out, control = tmp_path / "out", tmp_path / "control"
    control.mkdir()
    command = _command(tmp_path, tiny_assets, out, "--plugin", "tests/plugin_slow_save.py")
    process = _start(command, SLOW_SAVE_DIR=control)
    _wait_for_checkpoint(out, process)
    ranks = [p for p in psutil.Process(process.pid).children(recursive=True)
             if any(arg.startswith("--local_rank=") for arg in p.cmdline())]
    assert len(ranks) == 2
    (control / "arm").write_text("pause 3")  # the next save waits 3 s: time for a 2nd signal
    ranks[0].send_signal(signal.SIGTERM)  # one rank only: the vote must stop both
    _wait_for_file(control / "in_save", process)
    for rank in ranks:  # Slurm signals again, and every task: the save must not care
        rank.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 75, output[-3000:]
    assert "preemption signal" in output
    stopped_at = (out / "checkpoints" / "latest").read_text()
    assert f"checkpoint {out / 'checkpoints' / stopped_at} written" in output
    (control / "arm").unlink()
    result = _run(command, SLOW_SAVE_DIR=control)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from checkpoint {out / 'checkpoints' / stopped_at}" in result.stdout
    _assert_same_run(out, uninterrupted[0])
