"""A one-node Slurm cluster of real daemons in a temporary directory, for the tests of
launch/slurm/ (recipe: /work/shared/cluster.md, "A one-node Slurm cluster, started by a test").

``slurmctld`` and ``slurmd`` (Debian's slurm-wlm, run as root) with ``AuthType=auth/none``
(no munge), state, spool, pid and log files under the temp dir, ports picked free, a random
first job id (so the job-id-derived rendezvous port differs between clusters). The daemons
are started with ``-f <conf>``; ``SLURM_CONF`` is only in the environment of the client
commands (``cluster.env()``), which sbatch passes on to the jobs. Teardown cancels every job,
waits for them, stops both daemons, and SIGKILLs any process still carrying this cluster's
marker in its environment (job steps and tasks are forked from slurmd / from the sbatch
environment, so they all do).

Use:  ``from tests.slurm_cluster import slurm_cluster  # noqa: F401`` (a fixture), then
``slurm_cluster.run("sbatch", ...)``, ``slurm_cluster.job(job_id)`` etc.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cpu_env, free_port, skip_or_fail

VENV_BIN = str(Path(sys.executable).parent)
MARKER = "NGDIFF_TEST_SLURM_CLUSTER"
DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo", "srun")
# launch/slurm's knobs: a test sets the ones it means, none leaks in from the caller's shell
SCRIPT_KNOBS = ("NGDIFF_DS_CONFIG", "NGDIFF_ARGS", "NGDIFF_PYTHON", "NGDIFF_REPO",
                "NGDIFF_MASTER_ADDR", "NGDIFF_MASTER_PORT", "NGDIFF_MAX_REQUEUES",
                "NGDIFF_SRUN_ARGS", "NGDIFF_PREEMPT_MARKER")


def clean_env(env: dict) -> dict:
    """``env`` without Slurm's variables (e.g. when the tests run inside a job) and the knobs."""
    return {k: v for k, v in env.items() if not k.startswith("SLURM") and k not in SCRIPT_KNOBS}


def why_no_slurm() -> str | None:
    """None when this machine can run the cluster, else the reason (a skip message)."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name, path=_path()) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} not found; apt-get install slurm-wlm)"
    if os.geteuid() != 0:
        return "the test Slurm cluster runs slurmd as root (SlurmdUser=root)"
    return None


def _path() -> str:
    """PATH with the venv's bin first (cluster.md: the torch_extensions trap), then sbin."""
    parts = [VENV_BIN] + os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/usr/bin"]
    seen: list[str] = []
    for part in parts:
        if part and part not in seen:
            seen.append(part)
    return os.pathsep.join(seen)


def _memory_mb() -> int:
    try:
        out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "PATH": _path()}).stdout
        found = re.search(r"RealMemory=(\d+)", out)
        if found:
            return max(1, int(found.group(1)) - 256)
    except (OSError, subprocess.SubprocessError):
        pass
    return 1000


class SlurmCluster:
    """Config, daemons and client commands of one test cluster."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.logs = root / "log"
        self.cpus = os.cpu_count() or 1
        self._daemons: dict[str, subprocess.Popen] = {}

    # --- setup ---------------------------------------------------------------------------
    def write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = free_port(), free_port()
        while slurmd_port == ctld_port:
            slurmd_port = free_port()
        r = self.root
        self.conf.write_text(f"""\
ClusterName=ngdifftest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
FirstJobId={random.randint(1000, 900000)}
KillWait=5
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon_env(self) -> dict:
        env = clean_env(dict(os.environ))
        env.update(PATH=_path(), **{MARKER: str(self.root)})
        return env

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        commands = {"slurmctld": ["slurmctld", "-D", "-f", str(self.conf)],
                    "slurmd": ["slurmd", "-D", "-f", str(self.conf), "-N", "localhost"]}
        for name, command in commands.items():
            out = open(self.logs / f"{name}.stdout", "w")
            self._daemons[name] = subprocess.Popen(command, env=self._daemon_env(), stdout=out,
                                                   stderr=subprocess.STDOUT, cwd=self.root,
                                                   start_new_session=True)
            out.close()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self._daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail()}")
            state = self.run("sinfo", "-h", "-n", "localhost", "-o", "%T",
                             check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the node did not become idle in {timeout} s (state {state!r}):\n"
                           f"{self.log_tail()}")

    # --- clients -------------------------------------------------------------------------
    def env(self, **extra) -> dict:
        """Environment of a client command (and, through sbatch, of its job): CPU DeepSpeed,
        the venv first on PATH, SLURM_CONF, and the cluster's marker."""
        env = clean_env(cpu_env())
        env.update(PATH=_path(), SLURM_CONF=str(self.conf), **{MARKER: str(self.root)})
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *command: str, check: bool = True, timeout: float = 60, cwd=None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout,
                                cwd=cwd, env=env if env is not None else self.env())
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n"
                               f"{result.stdout}\n{result.stderr}")
        return result

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict ({} once the job is gone)."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0:
            return {}
        fields = {}
        for token in result.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait_for(self, job_id: str, predicate, timeout: float, poll: float = 0.25) -> dict:
        """Poll the job until ``predicate(fields)``; return the fields."""
        deadline = time.monotonic() + timeout
        fields: dict = {}
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if predicate(fields):
                return fields
            time.sleep(poll)
        raise AssertionError(f"job {job_id}: condition not met in {timeout} s; last state "
                             f"{fields.get('JobState')!r} Restarts={fields.get('Restarts')!r}\n"
                             f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        text = []
        for path in sorted(self.logs.glob("*")):
            content = path.read_text(errors="replace").splitlines()[-lines:]
            text.append(f"--- {path.name}\n" + "\n".join(content))
        return "\n".join(text)

    # --- teardown ------------------------------------------------------------------------
    def _job_ids(self) -> list[str]:
        try:
            result = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return []
        return result.stdout.split() if result.returncode == 0 else []

    def _leftovers(self) -> list[int]:
        """Pids of processes (other than ours) whose environment carries this cluster's marker."""
        needle = f"{MARKER}={self.root}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job of this cluster and wait until the queue is empty."""
        if not self._daemons or any(proc.poll() is not None for proc in self._daemons.values()):
            return
        jobs = self._job_ids()
        for job_id in jobs:
            self.run("scancel", job_id, check=False, timeout=20)
        deadline = time.monotonic() + timeout
        while jobs and time.monotonic() < deadline:
            time.sleep(0.3)
            jobs = self._job_ids()

    def stop(self) -> None:
        self.cancel_all()
        for name in reversed(DAEMONS):  # slurmd first, then the controller
            proc = self._daemons.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
        for _ in range(3):  # slurmstepd, batch shells, srun, ranks left behind
            pids = self._leftovers()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster (CPUs = this machine's cores), torn down after the module.
    Tests that submit jobs should cancel them when they end (``cancel_all``), also on failure."""
    reason = why_no_slurm()
    if reason:
        skip_or_fail(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
