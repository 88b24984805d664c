"""Shared fixtures: a tiny TOFU-schema data set, tokenizer and Llama, built once per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEEPSPEED = str(Path(PYTHON).parent / "deepspeed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(**extra) -> dict:
    """Environment for DeepSpeed on CPU (gloo), quiet, offline, with the venv's bin first on
    PATH (another ninja would rebuild DeepSpeed's CPU extension: shared/cluster.md)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(PYTHON).parent), env.get("PATH", "")])
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def single_rank_env(**extra) -> dict:
    """What a launcher exports, for running a launch script as a 1-rank job with plain python."""
    return cpu_env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, LOCAL_SIZE=1, MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=free_port(), **extra)


def run_deepspeed(num_ranks: int, script: str, args: list[str], timeout: float = 600, **env):
    """Run ``script`` under the real ``deepspeed`` launcher on CPU; returns CompletedProcess."""
    command = [DEEPSPEED, "--num_gpus", str(num_ranks), "--master_port", str(free_port()), script, *args]
    return subprocess.run(command, cwd=REPO, env=cpu_env(**env), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def cpu_adam_built(request):
    """DeepSpeed's CPU Adam (the optimizer of ZeRO-Offload), compiled once before the jobs that
    use it: the first load on a fresh venv compiles it for minutes, which inside a job would
    run into the job's timeout (and a killed build leaves a lock every later build waits on)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.ops.op_builder import CPUAdamBuilder

    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\nloading DeepSpeed's CPU Adam (compiled on first use: minutes on 2 cores)...",
              flush=True)
        CPUAdamBuilder().load(verbose=False)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """{'data': dir, 'model': dir} — 10 fictitious authors and a 2-layer Llama (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ngdiff_ds.default.synthetic import benchmark_texts, generate_benchmark
    from ngdiff_ds.default.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    generate_benchmark(root / "data", seed=1, num_authors=10)
    # QA texts only: the tiny model's loss landscape (which the GeN scenarios of
    # test_distributed.py rely on: a rate of 3 convex and downhill, 30 overshot) is that of
    # this vocabulary; byte-level BPE still encodes the passages, in more tokens.
    tokenizer = train_tokenizer(benchmark_texts(root / "data", passages=False), root / "tokenizer",
                                vocab_size=400)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")
    return {"data": str(root / "data"), "model": str(root / "model"), "root": root}


def skip_or_fail(reason: str) -> None:
    """A tool this machine lacks: skip locally, but fail in CI (CI=true), where .ci/run
    installs everything, so that a broken install is never counted as a pass."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)
