"""launch/slurm/unlearn.sbatch on a real one-node Slurm cluster (tests/slurm_cluster.py): 1 node
x 2 "GPUs" = 2 CPU ranks started by srun through launch/slurm/srun_rank.sh.

(a) A plain job gives the weights of the same command under ``deepspeed --num_gpus 2``.
(b) Preemption: ``scancel --signal=TERM`` once a checkpoint exists; the ranks checkpoint and
    exit 75, the script requeues the job, the rerun resumes (``--resume auto``) and finishes
    with the weights of an uninterrupted run, every train step logged exactly once.

Weights agree to 2e-5 absolute, the tolerance of tests/test_distributed.py (the two launchers
give the same ranks the same shards, so in practice they are bit-identical).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import PYTHON, REPO, cpu_env, run_deepspeed, skip_or_fail
from tests.slurm_cluster import clean_env, slurm_cluster  # noqa: F401  (a fixture)

SCRIPT = "launch/slurm/unlearn.sbatch"
WRAPPER = "launch/slurm/srun_rank.sh"
CONFIG = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
WEIGHT_ATOL = 2e-5
PREEMPTED = 75


@pytest.fixture
def cluster(slurm_cluster):  # noqa: F811
    """The module's cluster; this test's jobs are cancelled when it ends, pass or fail."""
    try:
        yield slurm_cluster
    finally:
        slurm_cluster.cancel_all()


def _user_args(tmp_path, tiny_assets, out, *extra):
    return ["--model", tiny_assets["model"], "--data", tiny_assets["data"],
            "--output-dir", str(tmp_path / out), "--no-eval", "--no-adaptive-lr",
            "--max-length", "64", *extra]


def _ds_config(tmp_path) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(CONFIG))
    return path


def _submit(cluster, tmp_path, args, *sbatch_options, timeout=60):
    """sbatch the job script for 1 node x 2 tasks; returns (CompletedProcess, output file)."""
    output = tmp_path / "slurm-%j.out"
    command = ["sbatch", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
               f"--output={output}", "--job-name=ngdiff-test", *sbatch_options, SCRIPT, *args]
    env = cluster.env(NGDIFF_DS_CONFIG=_ds_config(tmp_path), NGDIFF_PYTHON=PYTHON)
    result = cluster.run(*command, check=False, timeout=timeout, cwd=REPO, env=env)
    return result, output


def _job_output(tmp_path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("slurm-*.out")))


def _reference(tmp_path, args):
    """The same command under the deepspeed launcher, uninterrupted."""
    command = ["--deepspeed", str(_ds_config(tmp_path)), "--resume", "auto", *args]
    result = run_deepspeed(2, "launch/unlearn.py", command, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _worst_difference(a_dir: Path, b_dir: Path) -> float:
    a = load_file(str(a_dir / "model" / "model.safetensors"))
    b = load_file(str(b_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _train_steps(directory: Path) -> list[int]:
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if row["kind"] == "train"]


def test_the_wrapper_exports_each_ranks_place(tmp_path):
    """srun_rank.sh alone, with the variables srun sets for task 5 of 4+5+3 tasks on 3 nodes."""
    if shutil.which("scontrol") is None:
        skip_or_fail("needs Slurm's scontrol")
    conf = tmp_path / "slurm.conf"  # scontrol's hostlist expansion reads a configuration
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\n")
    slurm = {"SLURM_CONF": conf, "SLURM_JOB_ID": 123, "SLURM_PROCID": 5, "SLURM_NTASKS": 12,
             "SLURM_STEP_NUM_TASKS": 12, "SLURM_LOCALID": 1, "SLURM_NODEID": 1,
             "SLURMD_NODENAME": "gpu02", "SLURM_STEP_NODELIST": "gpu[01-03]",
             "SLURM_STEP_TASKS_PER_NODE": "4,5,3"}
    command = ["bash", WRAPPER, sys.executable, "-c",
               "import json, os; print(json.dumps(dict(os.environ)))"]
    env = {**clean_env(cpu_env()), **{k: str(v) for k, v in slurm.items()}}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    env = json.loads(result.stdout)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE",
                                "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "5", "WORLD_SIZE": "12", "LOCAL_RANK": "1", "LOCAL_SIZE": "5",
        "LOCAL_WORLD_SIZE": "5", "NODE_RANK": "1", "MASTER_ADDR": "gpu01", "MASTER_PORT": "10123"}


@pytest.mark.slow
def test_a_job_gives_the_weights_of_the_deepspeed_launcher(cluster, tmp_path, tiny_assets):
    args = _user_args(tmp_path, tiny_assets, "slurm", "--max-steps", "2")
    result, _ = _submit(cluster, tmp_path, args, "--wait", timeout=400)
    text = _job_output(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr + text[-6000:]
    assert "training finished" in text, text[-6000:]
    _reference(tmp_path, _user_args(tmp_path, tiny_assets, "reference", "--max-steps", "2"))
    assert _train_steps(tmp_path / "slurm") == [0, 1]
    worst = _worst_difference(tmp_path / "slurm", tmp_path / "reference")
    assert worst <= WEIGHT_ATOL, worst


@pytest.mark.slow
def test_a_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(
        cluster, tmp_path, tiny_assets):
    steps = 30
    extra = ("--max-steps", str(steps), "--save-every", "5")
    result, _ = _submit(cluster, tmp_path, _user_args(tmp_path, tiny_assets, "slurm", *extra),
                        "--parsable")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.strip().split(";")[0]
    latest = tmp_path / "slurm" / "checkpoints" / "latest"

    # the first scheduled checkpoint: then the signal, as Slurm sends it before a time limit
    deadline = time.monotonic() + 400  # generous: a busy machine, an extension rebuild
    while not latest.exists():
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING"), f"job {job_id} is {state}:\n{_job_output(tmp_path)}"
        assert time.monotonic() < deadline, _job_output(tmp_path)[-6000:]
        time.sleep(0.1)
    cluster.run("scancel", "--signal=TERM", job_id)

    # requeued by the script: the rerun is held ~2 min unless told to start now
    fields = cluster.wait_for(
        job_id, lambda f: f.get("JobState") == "PENDING" and f.get("Restarts") == "1", timeout=120)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    fields = cluster.wait_for(
        job_id, lambda f: f.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING",
                                                     "COMPLETING", "REQUEUED", None),
        timeout=400)
    text = _job_output(tmp_path)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, text[-8000:])
    assert fields["Restarts"] == "1", fields
    assert "preempted: a checkpoint is written" in text, text[-8000:]
    assert "run 2 (SLURM_RESTART_COUNT=1)" in text, text[-8000:]
    assert "training finished" in text, text[-8000:]

    _reference(tmp_path, _user_args(tmp_path, tiny_assets, "reference", *extra))
    assert _train_steps(tmp_path / "slurm") == list(range(steps))
    worst = _worst_difference(tmp_path / "slurm", tmp_path / "reference")
    assert worst <= WEIGHT_ATOL, worst
