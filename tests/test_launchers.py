"""The cluster launch paths of docs/cluster.md, on loopback: each gives the same job.

- Two "nodes" of one rank each (two ``deepspeed --no_ssh --hostfile`` launchers) and
  ``mpirun -np 2`` (DeepSpeed's mpi4py discovery) end with the same weights as 2 ranks on one
  node (``deepspeed --num_gpus 2``), the independent reference: the same global batches give
  the same update however the ranks were started (docs/design.md, "Batches").
- A rank killed with SIGKILL ends the whole job, non-zero, within a bound, no rank left.
- A rendezvous port held by another process exits 2 with one line saying how to pick
  another, at once, under plain python and under mpirun.

Every launched process gets the venv's ``bin`` first on PATH: DeepSpeed's CPU extension is
built with whichever ``ninja`` PATH finds, and a different one rebuilds the shared cache
(/work/shared/cluster.md, "A trap for test suites").
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tests.conftest import DEEPSPEED, PYTHON, REPO, cpu_env, free_port, single_rank_env

VENV_BIN = str(Path(PYTHON).parent)
MPIRUN = str(Path(VENV_BIN) / "mpirun")
CONFIG = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
RUN_TIMEOUT = 400      # one 2-step job; about 40-100 s here depending on the machine's load
KILL_BOUND = 60        # seconds from SIGKILL of one rank to the launcher's exit
WEIGHT_TOLERANCE = 2e-5
BUSY_BOUND = 240       # seconds; a retry until the 10-minute rendezvous timeout exceeds it
PORT_MESSAGE = "is already in use by another process"
NO_MPIRUN = pytest.mark.skipif(not Path(MPIRUN).is_file() and not os.environ.get("CI"),
                               reason="no mpirun in the venv: pip install -e .[mpi]")
# (in CI, which installs the [mpi] extra, a missing mpirun fails the tests instead)


def _env(**extra) -> dict:
    env = cpu_env(**extra)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    return env


def _script_args(tmp_path: Path, tiny_assets: dict, out: Path, steps: int = 2) -> list[str]:
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(CONFIG))
    return ["launch/unlearn.py", "--deepspeed", str(config), "--model", tiny_assets["model"],
            "--data", tiny_assets["data"], "--output-dir", str(out), "--max-steps", str(steps),
            "--no-eval", "--no-adaptive-lr", "--max-length", "64"]


def _start(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    """A job in a session of its own (so that a failed test can end every process of it),
    its output in a file (a pipe nobody reads would block it)."""
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _run_jobs(commands: list[list[str]], logs: list[Path], env: dict) -> list[int]:
    """Start the commands together (the launchers of one job) and wait for all of them."""
    processes = [_start(command, log, env) for command, log in zip(commands, logs)]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        return [process.returncode for process in processes]
    finally:
        for process in processes:
            _end(process)


def _tail(*logs: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)


def _assert_same_weights(out: Path, reference: Path) -> None:
    weights = load_file(str(out / "model" / "model.safetensors"))
    expected = load_file(str(reference / "model" / "model.safetensors"))
    assert sorted(weights) == sorted(expected)
    worst = max((weights[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= WEIGHT_TOLERANCE, worst
    for directory in (out, reference):
        summary = json.loads((directory / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 2, summary


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, tiny_assets):
    """The reference: 2 ranks on one node, ``deepspeed --num_gpus 2``."""
    tmp = tmp_path_factory.mktemp("one_node")
    out, log = tmp / "out", tmp / "launcher.log"
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
               *_script_args(tmp, tiny_assets, out)]
    [code] = _run_jobs([command], [log], _env())
    assert code == 0, _tail(log)
    initial = load_file(str(Path(tiny_assets["model"]) / "model.safetensors"))
    final = load_file(str(out / "model" / "model.safetensors"))
    # the comparisons below are between runs that moved the weights
    assert max((final[k] - initial[k]).abs().max().item() for k in initial) > 1e-3
    return out


@pytest.mark.slow
def test_two_nodes_of_one_rank_each_equal_two_ranks_on_one_node(tmp_path, tiny_assets, one_node):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")  # names need not resolve with --no_ssh
    out, port = tmp_path / "out", free_port()
    script = _script_args(tmp_path, tiny_assets, out)
    commands = [[DEEPSPEED, "--no_ssh", "--hostfile", str(hostfile), "--node_rank", str(node),
                 "--master_addr", "127.0.0.1", "--master_port", str(port), *script]
                for node in (0, 1)]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    assert _run_jobs(commands, logs, _env()) == [0, 0], _tail(*logs)
    assert "nnodes=2" in logs[1].read_text()  # really two launchers of one rank each
    _assert_same_weights(out, one_node)


@pytest.mark.slow
@NO_MPIRUN
def test_mpirun_equals_two_ranks_on_one_node(tmp_path, tiny_assets, one_node):
    out, log = tmp_path / "out", tmp_path / "mpirun.log"
    command = [MPIRUN, "-np", "2", PYTHON, *_script_args(tmp_path, tiny_assets, out)]
    # DeepSpeed's MPI discovery replaces MASTER_ADDR with `hostname -I`'s first address;
    # MASTER_PORT is kept (distributed.init_distributed passes it on).
    [code] = _run_jobs([command], [log], _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()))
    assert code == 0, _tail(log)
    _assert_same_weights(out, one_node)


def test_the_example_hostfile_is_two_nodes_of_eight_gpus_for_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile

    hosts = fetch_hostfile(str(REPO / "launch" / "hostfile.example"))
    assert list(hosts.items()) == [("node-1", 8), ("node-2", 8)]


def _wait_for(predicate, timeout: float, process: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the job ended before {what}:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{_tail(log)}"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_rank_killed_ends_the_whole_job(tmp_path, tiny_assets):
    """The deepspeed launcher polls its ranks every second; when one has exited non-zero it
    SIGTERMs the others, SIGKILLs any left after 30 s, and exits with that code."""
    log = tmp_path / "launcher.log"
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
               *_script_args(tmp_path, tiny_assets, tmp_path / "out", steps=1000)]
    launcher = _start(command, log, _env())
    try:
        _wait_for(lambda: re.search(r"step\s+\d+ \|", log.read_text()), RUN_TIMEOUT, launcher,
                  "training step", log)
        tree = psutil.Process(launcher.pid).children(recursive=True)
        ranks = {p: p.cmdline() for p in tree if "launch/unlearn.py" in p.cmdline()
                 and any(a.startswith("--local_rank=") for a in p.cmdline())}
        assert len(ranks) == 2, ranks
        [victim] = [p for p, line in ranks.items() if "--local_rank=1" in line]
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        try:
            code = launcher.wait(timeout=KILL_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {KILL_BOUND} s after a rank was killed:\n{_tail(log)}")
        took = time.monotonic() - killed
        _, alive = psutil.wait_procs(tree, timeout=5)
    finally:
        _end(launcher)
    output = log.read_text()
    print(f"job ended {took:.1f} s after SIGKILL of rank 1, exit code {code}")
    assert code != 0, output[-3000:]
    assert not alive, [p.cmdline() for p in alive]
    # Rank 0 fails at its next collective (gloo: "Connection closed by peer"), often before the
    # launcher's next poll: the launcher then reports whichever dead rank it looks at first,
    # -9 (SIGKILL, exit 247) or rank 0's 1, in a line that always quotes the last rank's command.
    assert re.search(r"exits with return code = (-9|1)\n", output), output[-3000:]
    assert code == 247 or "Connection closed by peer" in output, output[-3000:]
    assert not (tmp_path / "out" / "summary.json").exists()


def _busy_port():
    """A port held the way another job's rendezvous holds one: bound on every address,
    listening (a client then connects and waits forever instead of being refused)."""
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def _run_on_busy_port(command_head: list[str], tmp_path: Path, tiny_assets: dict, env: dict,
                      port_socket: socket.socket):
    script = _script_args(tmp_path, tiny_assets, tmp_path / "out")
    started = time.monotonic()
    with port_socket:
        result = subprocess.run([*command_head, *script, "--dist-timeout-minutes", "10"], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=BUSY_BOUND + 30)
    return result, time.monotonic() - started


def _assert_port_refused(result, took: float, where: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in (f"rendezvous port {where}", PORT_MESSAGE, "--master_port N", "MASTER_PORT=N"):
        assert needle in errors[0], (needle, errors[0])
    # refused at once, not after the rendezvous timeout (10 minutes here): the bound leaves
    # room for a slow start on a loaded machine (5-15 s quiet, up to 85 s seen under load)
    assert took < BUSY_BOUND, took


def test_a_busy_rendezvous_port_exits_2_with_how_to_pick_another(tmp_path, tiny_assets):
    sock, port = _busy_port()
    env = single_rank_env()
    env.update(MASTER_PORT=str(port), PATH=VENV_BIN + os.pathsep + env.get("PATH", ""))
    result, took = _run_on_busy_port([PYTHON], tmp_path, tiny_assets, env, sock)
    _assert_port_refused(result, took, f"127.0.0.1:{port}")


@pytest.mark.slow
@NO_MPIRUN
def test_a_busy_port_under_mpirun_ends_every_rank(tmp_path, tiny_assets):
    """Under mpirun the port is MASTER_PORT (not DeepSpeed's 29500). Rank 0 tries it before
    DeepSpeed starts and tells rank 1, and both exit 2 by themselves: rank 1 would otherwise
    hang connecting to the holder, and killing it could leave the lock of DeepSpeed's CPU
    extension behind (every later DeepSpeed run on the machine then waits forever)."""
    sock, port = _busy_port()
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    result, took = _run_on_busy_port([MPIRUN, "-np", "2", PYTHON], tmp_path, tiny_assets, env, sock)
    _assert_port_refused(result, took, f"{port} on rank 0's node")
    assert "BAD TERMINATION" not in result.stdout + result.stderr  # no rank was killed
