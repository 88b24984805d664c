"""Running ``launch/unlearn.py`` once per benchmark run, shared by the benchmarks that compare
whole runs (lr_robustness.py, compare_methods.py).

A run directory that already holds a ``summary.json`` written with the same command (the
rendezvous port aside, recorded in ``settings.txt``) is reused instead of rerun.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unlearn_command(ranks: int, flags: list[str]) -> list[str]:
    """``deepspeed --num_gpus RANKS launch/unlearn.py FLAGS`` on a free rendezvous port."""
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
            "launch/unlearn.py", *flags]


def settings_of(command: list[str]) -> str:
    """The command without its rendezvous port: what makes two runs the same run."""
    port = command.index("--master_port")
    return shlex.join(command[:port] + command[port + 2:])


def run_once(command: list[str], out: Path, label: str, threads_per_rank: int | None = None,
             rerun: bool = False) -> bool:
    """Run ``command`` (whose --output-dir is ``out``) unless ``out`` holds its finished run;
    its output goes to ``out/log.txt``. Returns whether it ran; exits naming the log on failure.
    ``threads_per_rank``: OMP_NUM_THREADS on CPU when not set already."""
    settings_file = out / "settings.txt"
    if not rerun and (out / "summary.json").exists() and settings_file.exists() \
            and settings_file.read_text().strip() == settings_of(command):
        return False
    out.mkdir(parents=True, exist_ok=True)
    settings_file.unlink(missing_ok=True)
    env = dict(os.environ)
    if env.get("DS_ACCELERATOR") == "cpu" and "OMP_NUM_THREADS" not in env and threads_per_rank:
        env["OMP_NUM_THREADS"] = str(threads_per_rank)
    began = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        code = subprocess.call(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"[{label}] exit {code} in {time.perf_counter() - began:.0f} s", flush=True)
    if code != 0:
        raise SystemExit(f"run {out} failed (exit {code}); see {out / 'log.txt'}")
    settings_file.write_text(settings_of(command) + "\n")
    return True


def save_plot(figure, axes, path: Path, legend_title: str | None = None) -> None:
    """The legend beside the axes, then the PNG at ``path`` (and the figure closed)."""
    import matplotlib.pyplot as plt

    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title=legend_title,
                title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
