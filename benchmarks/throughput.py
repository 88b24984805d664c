"""Throughput of the real training step on a Llama-architecture model, per mode, in one run.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 benchmarks/throughput.py --steps 8
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/throughput.py --steps 8
    deepspeed --num_gpus 8 benchmarks/throughput.py --bf16 --hidden-size 2048 --layers 16 \\
        --heads 16 --intermediate-size 5504 --seq-len 1024 --micro-batch-size 4
    deepspeed --num_gpus 8 benchmarks/throughput.py --bf16 --config /models/llama-7b  # its config.json
    sbatch --nodes N benchmarks/scaling.sbatch ...   # one node count of a scaling study

The model has random weights: built from the size flags (or ``--config DIR``'s config.json),
written once per node by its local rank 0 under ``--model-cache`` and loaded through
``engine.build_engine`` like a real run (``--model DIR`` takes a saved HF model instead). Every
mode runs on that one engine, the same optimizer (torch AdamW) and the same random batches:

- ``ngdiff``: ``trainer.ngdiff_step`` (forget pass, capture, retain pass, the one all-reduce,
  combine, step) at a fixed rate;
- ``ngdiff_adaptive``: the same with the adaptive rate (``lr_probe.AdaptiveRate``) at its
  default period, probing and fitting after its fit steps as ``run_unlearning`` does — at a
  fixed period and with no backtracking (``max_rise 0``, no refits), so the cost measured is
  that of the three probe forwards per fit; on real data a backtrack adds 1-3 forwards and a
  refit one more fit (lr_robustness.py counts them per run);
- ``floor``: stock ZeRO-3 doing the same forward/backward work: K forget and K retain
  micro-batches, forward + ``engine.backward`` each (accumulated), one ``engine.step``; no
  capture, no norms, no combine;
- ``gdiff``: GDiff as the peers run it: per micro-batch one forward over the forget and retain
  rows together, the two losses summed, one backward; one ``engine.step``.

Modes are timed in alternating blocks of ``--block`` steps (the first mode of each round
rotates), so drift in machine load hits all alike; the first ``--warmup`` steps of each mode
are not counted. Each round feeds every mode the same batches.

Per mode (``throughput.json``, ``throughput.md``, ``throughput.png`` under ``--output-dir``,
written by rank 0):

- tokens/s: input tokens of both tasks (2 K x micro-batch x seq per rank and step) over the
  mean step time (probes included, amortised), in total and per rank; also from the median;
- median and mean step time and the breakdown: forget fwd+bwd, retain fwd+bwd (GDiff: the
  joint fwd+bwd), optimizer step (``engine.step``), probes, and "norms and combine": the rest
  of the step (NGDiff: the forget-gradient capture, the all-reduce, the combine; the probes'
  theta_old copy on fit steps). Each phase is timed with a synchronisation at its edges
  (``torch.cuda.synchronize`` on CUDA; on CPU the wall clock needs none), for every mode alike;
- peak memory per rank. CUDA: ``torch.cuda.max_memory_allocated`` over the mode's blocks (the
  peak statistics reset at each block's start) minus what was allocated before the model was
  built. CPU: the peak resident set size (``VmHWM`` of /proc/self/status, reset at each
  block's start by writing 5 to /proc/self/clear_refs, after glibc's free heap is handed back
  with ``malloc_trim`` so that a mode does not start from what the previous one left cached)
  minus the RSS measured just before the model is built (after the imports, including the
  modules the build loads, the process group and the model files: the process's library
  baseline, which the plan does not count). Where clear_refs cannot be written,
  ``resource.getrusage``'s ``ru_maxrss`` (the peak of the whole run so far: not per mode) is
  used and the record says so. Also the memory resident at the start of the mode's blocks
  ("resident"), and with ``--profile-memory`` (CPU) the peak of live tensor bytes over one
  more step under torch's profiler (what the plan counts, without allocator cache, runtime
  state or gloo's own buffers);
- the plan's prediction (``ngdiff_ds.plan.memory_breakdown``) for the same model, precision,
  micro-batch, sequence, K, checkpointing and ZeRO settings, and measured / predicted. On a
  CPU-only run every part is host memory: the prediction is ``gpu_peak + cpu_per_rank``; on
  CUDA it is ``gpu_peak``. ``floor`` is predicted as ``ngdiff`` less the forget-gradient copy;
- on CUDA, the MFU as torchtitan reports it: FLOPs per token ``6 N + 12 L H d T`` (N the
  parameters without the input embedding, L layers, H heads, d head dim, T the sequence
  length; recomputation and the probes' forwards are not counted) times tokens/s per rank,
  over the device's peak dense bf16 FLOP/s from ``PEAK_BF16_FLOPS`` (``--peak-flops``
  overrides it; fp32 runs are measured against the same bf16 peak).

Scaling: ``--scaling weak`` (default: a fixed per-rank ``--micro-batch-size``) or
``--global-batch G`` (strong scaling: micro-batch = G / (ranks x K)); the record says which,
and ``benchmarks/scaling_report.py`` merges records of several node counts. The node count is
the launcher's (``CROSS_SIZE`` of the deepspeed launcher, ``NNODES``, Slurm's
``SLURM_STEP_NUM_NODES``/``SLURM_JOB_NUM_NODES``), else ranks / ranks per node.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))
sys.path.insert(0, str(BENCHMARKS))

from step_overhead import METHOD, random_batches, synchronize  # noqa: E402

from ngdiff_ds import trainer  # noqa: E402
from ngdiff_ds.adaptive_lr import AdaptiveLRConfig  # noqa: E402
from ngdiff_ds.config import BatchLayout, engine_config, read_json  # noqa: E402
from ngdiff_ds.distributed import barrier, init_distributed, leave_distributed  # noqa: E402
from ngdiff_ds.errors import exit_past_teardown  # noqa: E402
from ngdiff_ds.engine import build_engine, set_learning_rate  # noqa: E402
from ngdiff_ds.errors import BadInput  # noqa: E402
from ngdiff_ds.lr_probe import AdaptiveRate  # noqa: E402
from ngdiff_ds.memory import MemorySettings  # noqa: E402
from ngdiff_ds.plan import PlanSettings, ZeroAssumptions, load_model, memory_breakdown  # noqa: E402

MODES = ("ngdiff", "ngdiff_adaptive", "floor", "gdiff")
LR = 1e-5
# The phases of a step, in the order the table shows them. "norms_and_combine" is measured as
# the step time less the other phases (see the module docstring).
PHASES = ("forget_fwd_bwd", "retain_fwd_bwd", "joint_fwd_bwd", "norms_and_combine",
          "optimizer_step", "probes")
# Peak dense bf16 tensor FLOP/s by device name (first match wins, so the specific names come
# first), from NVIDIA's data sheets as torchtitan's get_peak_flops uses them (sparsity halved).
PEAK_BF16_FLOPS = (
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12),
    ("GH200", 989e12), ("H800", 989e12), ("H20", 148e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L4", 121e12), ("B200", 2250e12), ("B100", 1750e12),
)
# The plan has no floor mode: the floor is NGDiff's work without the forget-gradient copy.
PLAN_MODE = {"ngdiff": "ngdiff", "ngdiff_adaptive": "ngdiff_adaptive", "floor": "ngdiff",
             "gdiff": "gdiff"}
MIB = 2 ** 20


# ----- arguments ---------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    model = parser.add_argument_group("the model (random weights unless --model)")
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--heads", type=int, default=None, help="default: hidden size / 64")
    model.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    model.add_argument("--intermediate-size", type=int, default=None,
                       help="default: 4 x hidden size")
    model.add_argument("--vocab-size", type=int, default=32000)
    model.add_argument("--config", metavar="DIR",
                       help="an HF config.json (or its directory) instead of the size flags")
    model.add_argument("--model", metavar="DIR", help="a saved HF model instead of random weights")
    model.add_argument("--model-cache", metavar="DIR", default=tempfile.gettempdir(),
                       help="where each node writes the random model (default: the temp dir)")
    run = parser.add_argument_group("the run")
    run.add_argument("--micro-batch-size", type=int, default=4, help="rows per task per rank")
    run.add_argument("--global-batch", type=int, default=None,
                     help="strong scaling: rows per task over all ranks; micro-batch = this / "
                          "(ranks x --accum)")
    run.add_argument("--scaling", choices=("weak", "strong"), default=None,
                     help="what the record says it is (default: strong with --global-batch, "
                          "else weak)")
    run.add_argument("--accum", type=int, default=1, help="K: micro-batches per task per step")
    run.add_argument("--seq-len", type=int, default=64)
    run.add_argument("--steps", type=int, default=16, help="timed steps per mode")
    run.add_argument("--warmup", type=int, default=2, help="untimed first steps per mode")
    run.add_argument("--block", type=int, default=8, help="steps per alternating block")
    run.add_argument("--period", type=int, default=AdaptiveLRConfig().period,
                     help="the adaptive rate's fit period (default: its default)")
    run.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    run.add_argument("--gradient-checkpointing", action="store_true")
    run.add_argument("--bf16", action="store_true", help="bf16 weights (GPU)")
    run.add_argument("--deepspeed", metavar="JSON",
                     help="take optimizer and zero_optimization from this file (default: torch "
                          "AdamW and the plan's ZeRO assumptions)")
    run.add_argument("--profile-memory", action="store_true",
                     help="CPU: after the timing, one step of each mode under torch's profiler "
                          "for the peak of live tensor bytes (beside the peak RSS)")
    run.add_argument("--peak-flops", type=float, default=None,
                     help="the device's peak FLOP/s for the MFU (default: PEAK_BF16_FLOPS)")
    run.add_argument("--output-dir", default="runs/throughput")
    args = parser.parse_args(argv)
    for name in ("layers", "vocab_size", "hidden_size", "micro_batch_size", "accum", "seq_len",
                 "steps", "block", "period"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.scaling is None:
        args.scaling = "strong" if args.global_batch else "weak"
    return args


def micro_batch_for(args, world_size: int, rank: int) -> int:
    """Rows per forward per rank: the flag, or under strong scaling the global batch's share
    (exit 2, as the launchers do for bad input, when it does not divide)."""
    if not args.global_batch:
        return args.micro_batch_size
    per_step = world_size * args.accum
    if args.global_batch % per_step:
        if rank == 0:
            print(f"error: --global-batch {args.global_batch} is not a multiple of ranks x "
                  f"--accum = {world_size} x {args.accum}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return args.global_batch // per_step


# ----- the model ---------------------------------------------------------------------------

def model_config(args) -> dict:
    """The HF config of the benchmarked model, as a dict."""
    if args.model:
        return json.loads((Path(args.model) / "config.json").read_text())
    if args.config:
        path = Path(args.config)
        return json.loads((path / "config.json" if path.is_dir() else path).read_text())
    heads = args.heads or max(1, args.hidden_size // 64)
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": args.vocab_size, "hidden_size": args.hidden_size,
            "intermediate_size": args.intermediate_size or 4 * args.hidden_size,
            "num_hidden_layers": args.layers, "num_attention_heads": heads,
            "num_key_value_heads": args.kv_heads or heads,
            "max_position_embeddings": max(128, args.seq_len), "tie_word_embeddings": False}


def model_dims(config: dict) -> dict:
    """The sizes the record and the FLOP count need."""
    heads = config["num_attention_heads"]
    return {"vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
            "intermediate_size": config["intermediate_size"],
            "layers": config["num_hidden_layers"], "heads": heads,
            "kv_heads": config.get("num_key_value_heads") or heads,
            "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False))}


def random_model_dir(config: dict, dtype: torch.dtype, cache: str) -> Path:
    """Where the random model of ``config`` in ``dtype`` lives: one directory per content."""
    key = hashlib.sha256(json.dumps([config, str(dtype)], sort_keys=True).encode()).hexdigest()
    return Path(cache) / f"ngdiff_throughput_{key[:16]}"


def write_random_model(config: dict, dtype: torch.dtype, path: Path) -> None:
    """Save a seeded random model at ``path``, atomically: several nodes may share the cache
    (the same seed gives every node the same weights), and a half-written one is never read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").is_file():
        return
    hf_config = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    model.save_pretrained(staging, safe_serialization=True)
    del model
    try:
        os.replace(staging, path)
    except OSError:  # another node's rank renamed its copy there first
        shutil.rmtree(staging, ignore_errors=True)


def prepare_model(args, config: dict, dtype: torch.dtype) -> str:
    """The model directory every rank loads; each node's local rank 0 writes the random one."""
    if args.model:
        return args.model
    path = random_model_dir(config, dtype, args.model_cache)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_random_model(config, dtype, path)
    barrier()
    return str(path)


def deepspeed_config(args, micro_batch: int, world_size: int) -> dict:
    """The engine's config: torch AdamW and the ZeRO settings the plan assumes, or --deepspeed's."""
    if args.deepspeed:
        source = read_json(args.deepspeed)
        base = {"optimizer": source["optimizer"], "zero_optimization": source["zero_optimization"]}
    else:
        base = {"optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}},
                "zero_optimization": {"stage": 3, "overlap_comm": False,
                                      "contiguous_gradients": True, **asdict(ZeroAssumptions())}}
    base["train_micro_batch_size_per_gpu"] = micro_batch
    base["bf16"] = {"enabled": args.bf16}
    return engine_config(base, BatchLayout(micro_batch, args.accum, world_size))


# ----- where a process is ------------------------------------------------------------------

def local_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))


def node_count(world_size: int) -> tuple[int, str]:
    """(nodes, where the number came from): the launcher's count, else ranks / ranks per node."""
    for name in ("CROSS_SIZE", "NNODES", "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name]), name
    return max(1, world_size // max(1, local_size())), "ranks / LOCAL_SIZE"


def all_hostnames(world_size: int) -> list[str]:
    """Every rank's host name, in rank order (a collective over the default group)."""
    names = [None] * world_size
    dist.all_gather_object(names, socket.gethostname())
    return names


# ----- memory ------------------------------------------------------------------------------

def import_what_the_build_loads(config: dict) -> None:
    """Import the modules ``build_engine`` would import, so that their code and import-time
    objects are part of the baseline: the plan does not count the process's libraries."""
    import importlib

    importlib.import_module("deepspeed.runtime.engine")
    importlib.import_module("deepspeed.runtime.zero.stage3")
    name = config.get("model_type", "llama").replace("-", "_")
    try:
        importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:  # an unusual layout: its import then falls after the baseline
        pass


def return_free_heap() -> None:
    """Give the heap glibc keeps after frees back to the system (``malloc_trim``), so that a
    mode's peak RSS does not start from what the previous mode's block left cached. A no-op
    where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(found.group(1)) if found else 0


class PeakMemory:
    """This process's memory: a baseline, and the peak since the last ``reset`` (bytes)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.method = ("torch.cuda.max_memory_allocated" if self.cuda else self._cpu_method())
        self.baseline = self.current()

    @staticmethod
    def _cpu_method() -> str:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return "VmHWM (reset via /proc/self/clear_refs)"
        except OSError:
            return "ru_maxrss (peak of the whole run, not per mode)"

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        if self.method.startswith("VmHWM"):
            return _status_kib("VmRSS") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.method.startswith("VmHWM"):
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        if self.method.startswith("VmHWM"):
            return _status_kib("VmHWM") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----- timing ------------------------------------------------------------------------------

class PhaseTimer:
    """Seconds per named phase of the current step, each phase synchronised at its edges."""

    def __init__(self):
        self.step = defaultdict(float)

    def start_step(self) -> None:
        self.step = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize()
            self.step[name] += time.perf_counter() - start


def instrument(built, timer: PhaseTimer) -> None:
    """Time the two task passes inside ``ngdiff_step`` and every ``engine.step``, without
    copying the step: ``trainer._task_backward`` and this engine's ``step`` are wrapped."""
    task_backward = trainer._task_backward

    def timed_task_backward(built_, micro_batches, loss_fn, weights=None):
        phase = "forget_fwd_bwd" if loss_fn is METHOD.forget_loss else "retain_fwd_bwd"
        with timer.phase(phase):
            return task_backward(built_, micro_batches, loss_fn, weights)

    engine_step = built.engine.step

    def timed_engine_step(*args, **kwargs):
        with timer.phase("optimizer_step"):
            return engine_step(*args, **kwargs)

    trainer._task_backward = timed_task_backward
    built.engine.step = timed_engine_step


# ----- the modes ---------------------------------------------------------------------------

class RandomTask:
    """A task's batches, as ``lr_probe.AdaptiveRate`` asks for them (``TaskData``'s one call)."""

    def __init__(self, shape: SimpleNamespace, seed_offset: int):
        self.shape, self.seed_offset = shape, seed_offset

    def micro_batches(self, step: int, rank: int, device) -> list[dict]:
        batches = random_batches(self.shape, rank, self.shape.accum, 2 * step + self.seed_offset)
        return [{k: v.to(device) for k, v in batch.items()} for batch in batches]


class SilentLog:
    """The run log ``AdaptiveRate`` writes its fit rows to: dropped (the benchmark's own
    record is what it reports)."""

    def record(self, *args, **kwargs) -> None:
        pass

    def print(self, *args, **kwargs) -> None:
        pass


def floor_step(built, forget, retain, timer: PhaseTimer, state) -> None:
    """Stock ZeRO-3: 2K forwards and backwards accumulated, one optimizer step."""
    engine = built.engine
    weight = 1.0 / (len(forget) + len(retain))  # what gradient_accumulation_steps = 2K divides by
    for phase, loss_fn, batches in (("forget_fwd_bwd", METHOD.forget_loss, forget),
                                    ("retain_fwd_bwd", METHOD.retain_loss, retain)):
        with timer.phase(phase):
            for batch in batches:
                logits = engine(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits
                engine.backward(loss_fn(logits, batch) * weight)
    set_learning_rate(engine, LR)
    engine.step()


def gdiff_step(built, forget, retain, timer: PhaseTimer, state) -> None:
    """GDiff as the peers run it: one forward over both tasks' rows, the losses summed."""
    engine = built.engine
    with timer.phase("joint_fwd_bwd"):
        for forget_batch, retain_batch in zip(forget, retain):
            joint = {k: torch.cat([forget_batch[k], retain_batch[k]]) for k in forget_batch}
            logits = engine(input_ids=joint["input_ids"],
                            attention_mask=joint["attention_mask"]).logits
            rows = forget_batch["input_ids"].shape[0]
            loss = (METHOD.forget_loss(logits[:rows], forget_batch)
                    + METHOD.retain_loss(logits[rows:], retain_batch))
            engine.backward(loss / len(forget))
    set_learning_rate(engine, LR)
    engine.step()


def ngdiff_mode_step(built, forget, retain, timer: PhaseTimer, state) -> None:
    trainer.ngdiff_step(built, forget, retain, METHOD, LR, state.spare, state.steps_done)


def adaptive_mode_step(built, forget, retain, timer: PhaseTimer, state) -> None:
    """NGDiff with the adaptive rate, as ``run_unlearning`` runs a step of it."""
    rate, step = state.rate, state.steps_done
    probe_now = rate.probes_after(step)
    stats = trainer.ngdiff_step(built, forget, retain, METHOD, rate.lr(step), state.spare, step,
                                keep_step_delta=probe_now)
    if probe_now and not stats.skipped:
        with timer.phase("probes"):
            rate.probe_and_fit(built, step, state.spare)
        state.fits += 1


STEP_FUNCTIONS = {"ngdiff": ngdiff_mode_step, "ngdiff_adaptive": adaptive_mode_step,
                  "floor": floor_step, "gdiff": gdiff_step}
USES_SPARE = ("ngdiff", "ngdiff_adaptive")


class ModeState:
    """What one mode keeps between its blocks, and what was measured of it."""

    def __init__(self, mode: str, rate: AdaptiveRate | None):
        self.mode, self.rate = mode, rate
        self.spare = None
        self.steps_done = 0
        self.fits = 0
        self.step_times: list[float] = []
        self.phases: list[dict] = []
        self.fit_flags: list[bool] = []
        self.peak = 0
        self.resident = 0
        self.tensor_peak = 0  # --profile-memory (CPU): live tensor bytes at the step's peak


# ----- the run -----------------------------------------------------------------------------

def run_block(built, state: ModeState, tasks, first_data_step: int, count: int,
              timer: PhaseTimer, memory: PeakMemory) -> None:
    """``count`` steps of one mode, its peak memory over them."""
    step_function = STEP_FUNCTIONS[state.mode]
    device = built.device
    rank = dist.get_rank()
    if state.mode in USES_SPARE:
        # Allocated per block (and touched, outside the timing) so that the other modes'
        # peaks do not carry the copy NGDiff keeps.
        state.spare = torch.zeros_like(built.partitions.flat_grad)
    synchronize()
    if not memory.cuda:
        return_free_heap()
    memory.reset()
    state.resident = max(state.resident, memory.current() - memory.baseline)
    for i in range(count):
        forget, retain = (task.micro_batches(first_data_step + i, rank, device) for task in tasks)
        fits_before = state.fits
        timer.start_step()
        synchronize()
        start = time.perf_counter()
        step_function(built, forget, retain, timer, state)
        synchronize()
        state.step_times.append(time.perf_counter() - start)
        state.phases.append(dict(timer.step))
        state.fit_flags.append(state.fits > fits_before)
        state.steps_done += 1
    state.peak = max(state.peak, memory.peak() - memory.baseline)
    state.spare = None


def run_rounds(built, states: list[ModeState], tasks, args, timer, memory, rank: int) -> None:
    """Alternate the modes in blocks until each has run warmup + steps; each round starts
    with the next mode and feeds all modes the same data."""
    total = args.warmup + args.steps
    round_index = 0
    while min(s.steps_done for s in states) < total:
        order = states[round_index % len(states):] + states[:round_index % len(states)]
        first_data_step = round_index * args.block
        for state in order:
            count = min(args.block, total - state.steps_done)
            if count <= 0:
                continue
            run_block(built, state, tasks, first_data_step, count, timer, memory)
            if rank == 0:
                recent = state.step_times[-count:]
                print(f"[throughput] round {round_index}: {state.mode:15s} steps "
                      f"{state.steps_done - count:3d}-{state.steps_done - 1:3d} | median "
                      f"{statistics.median(recent) * 1000:8.1f} ms", flush=True)
        round_index += 1


def live_tensor_bytes() -> int:
    """Bytes of the CPU tensor storages Python can reach (each storage counted once)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0),
                                               storage.nbytes())
    return sum(storages.values())


def allocation_peak(profiler) -> int:
    """The highest running sum of the CPU allocations and frees the profiler recorded."""
    events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                    if e.name() == "[memory]"
                    and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def profile_tensor_peaks(built, states: list[ModeState], tasks, data_step: int) -> None:
    """--profile-memory on CPU: one more step of each mode under torch's profiler, for the
    peak of live tensor bytes (the CPU analogue of CUDA's allocator peak: no allocator cache,
    no libraries), which tells the plan's counting apart from what RSS adds around it."""
    from torch.profiler import ProfilerActivity, profile

    timer = PhaseTimer()
    for state in states:
        if state.mode in USES_SPARE:
            state.spare = torch.zeros_like(built.partitions.flat_grad)
        forget, retain = (task.micro_batches(data_step, dist.get_rank(), built.device)
                          for task in tasks)
        live = live_tensor_bytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            STEP_FUNCTIONS[state.mode](built, forget, retain, timer, state)
        state.steps_done += 1
        state.tensor_peak = live + allocation_peak(profiler)
        state.spare = None


# ----- summaries ---------------------------------------------------------------------------

def breakdown(phases: list[dict], step_times: list[float]) -> list[dict]:
    """Each step's phases with the remainder of the step as ``norms_and_combine``."""
    rows = []
    for measured, total in zip(phases, step_times):
        row = {phase: measured.get(phase, 0.0) for phase in PHASES}
        row["norms_and_combine"] = max(0.0, total - sum(row.values()))
        rows.append(row)
    return rows


def summarize_mode(state: ModeState, warmup: int, tokens_per_rank_step: int,
                   world_size: int) -> dict:
    """Times and rates of one mode over its timed steps (rank 0's clock)."""
    times = state.step_times[warmup:]
    rows = breakdown(state.phases, state.step_times)[warmup:]
    fit_steps = [row for row, fit in zip(rows, state.fit_flags[warmup:]) if fit]
    mean, median = statistics.mean(times), statistics.median(times)
    tokens_per_step = tokens_per_rank_step * world_size
    return {
        "tokens_per_s": tokens_per_step / mean,
        "tokens_per_s_per_rank": tokens_per_rank_step / mean,
        "tokens_per_s_from_median": tokens_per_step / median,
        "median_step_s": median, "mean_step_s": mean, "step_times_s": times,
        "breakdown_median_s": {p: statistics.median(r[p] for r in rows) for p in PHASES},
        "breakdown_mean_s": {p: statistics.mean(r[p] for r in rows) for p in PHASES},
        "fit_steps": len(fit_steps),
        "probe_s_per_fit": (statistics.mean(r["probes"] for r in fit_steps)
                            if fit_steps else None),
    }


def gather_per_rank(values: list[int], device) -> list[list[int]]:
    """``values`` of every rank (rank-major), by one all-gather over the default group."""
    local = torch.tensor(values, dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [[int(v) for v in t.tolist()] for t in gathered]


def plan_predictions(model_dir: str, args, micro_batch: int, world_size: int,
                     zero: dict, on_cuda: bool) -> dict:
    """The plan's peak memory per rank for each benchmarked mode (bytes), with its parts."""
    fields = {f: zero[f] for f in asdict(ZeroAssumptions()) if f in zero}
    offload = zero.get("offload_optimizer", {}).get("device") == "cpu"
    try:
        settings = PlanSettings(config=model_dir, gpus_per_node=max(1, local_size()), nodes=(1,),
                                precision="bf16" if args.bf16 else "fp32", offload=offload,
                                offload_params=offload and zero.get("offload_param", {}).get(
                                    "device") == "cpu",
                                micro_batch_size=micro_batch, seq_len=args.seq_len,
                                grad_accum_steps=args.accum,
                                gradient_checkpointing=args.gradient_checkpointing,
                                lr_period=args.period, zero=ZeroAssumptions(**fields),
                                # torch AdamW: the foreach path on CUDA, single-tensor on CPU
                                optimizer="torch-foreach" if torch.cuda.is_available()
                                else "torch-single")
        model = load_model(settings)
    except BadInput as error:  # e.g. a --config the plan does not model
        return {mode: {"error": str(error)} for mode in MODES}
    predictions = {}
    for mode in MODES:
        parts = memory_breakdown(model, settings, PLAN_MODE[mode], world_size).as_dict()
        # On CUDA the host side (offload) is not what the allocator measures; on CPU it is.
        peak = parts["gpu_peak"] + (0 if on_cuda else parts["cpu_per_rank"])
        if mode == "floor":  # the floor keeps no forget-gradient copy
            peak -= parts["gpu"]["ngdiff_extra"] + (0 if on_cuda
                                                    else parts["cpu"].get("ngdiff_extra", 0))
        predictions[mode] = {"plan_mode": PLAN_MODE[mode], "predicted_peak_bytes": peak,
                             "parts": parts}
    return predictions


def flops_per_token(dims: dict, parameters: int, embedding: int, seq_len: int) -> int:
    """torchtitan's count: 6 x the parameters less the input embedding (a tied embedding
    also does the head's matmul, so it stays), plus 12 L H d T for attention."""
    dense = parameters - (0 if dims["tie_word_embeddings"] else embedding)
    return 6 * dense + 12 * dims["layers"] * dims["heads"] * dims["head_dim"] * seq_len


def peak_flops(device_name: str) -> float | None:
    for name, flops in PEAK_BF16_FLOPS:
        if name in device_name:
            return flops
    return None


def cpu_name() -> str:
    """The processor's model name (platform.processor() is empty on most Linux systems)."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    return found.group(1).strip() if found else (platform.processor() or "cpu")


def parameter_counts(built) -> tuple[int, int]:
    """(all parameters, those of the input embedding) of the ZeRO-3 model (full sizes)."""
    module = built.model
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())
    weight = module.get_input_embeddings().weight
    return total, weight.ds_numel if hasattr(weight, "ds_numel") else weight.numel()


# ----- output ------------------------------------------------------------------------------

def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(record: dict) -> str:
    """The record as markdown: a heading, the throughput table and the memory table."""
    r = record
    lines = [f"# Throughput: {r['model']['parameters'] / 1e6:.1f}M-parameter Llama, "
             f"{r['world_size']} rank(s) on {r['nodes']} node(s), {r['device_name']}",
             "",
             f"{r['precision']}, micro-batch {r['micro_batch_size']} x {r['seq_len']} tokens "
             f"per task, K = {r['accum']}, global batch {r['global_batch']} rows per task, "
             f"activation checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, "
             f"{r['steps']} timed steps per mode (after {r['warmup']}), blocks of {r['block']}, "
             f"adaptive rate period {r['adaptive_period']}; {r['scaling']} scaling.",
             "",
             "Times in ms: median step, and the median of each phase over the timed steps "
             "(probes: mean per step, amortised over the period); tokens/s from the mean step.",
             "",
             "| mode | tokens/s | tokens/s/rank | median step | mean step | forget f+b | "
             "retain f+b | joint f+b | norms+combine | opt step | probes | MFU |",
             "| --- | " + " | ".join(["---:"] * 11) + " |"]
    for mode, m in r["modes"].items():
        b, mean = m["breakdown_median_s"], m["breakdown_mean_s"]
        mfu = "-" if m.get("mfu") is None else f"{m['mfu'] * 100:.1f} %"
        lines.append(f"| {mode} | {m['tokens_per_s']:.0f} | {m['tokens_per_s_per_rank']:.0f} | "
                     f"{_ms(m['median_step_s'])} | {_ms(m['mean_step_s'])} | "
                     f"{_ms(b['forget_fwd_bwd'])} | {_ms(b['retain_fwd_bwd'])} | "
                     f"{_ms(b['joint_fwd_bwd'])} | {_ms(b['norms_and_combine'])} | "
                     f"{_ms(b['optimizer_step'])} | {_ms(mean['probes'])} | {mfu} |")
    lines += ["", f"Peak memory per rank, MiB ({r['memory_method']}, above the baseline of "
                  f"{_mib(r['memory_baseline_bytes'])} MiB measured before the model was built; "
                  "the worst rank):", "",
              "| mode | measured peak | plan | measured / plan | resident at block start | "
              "tensor peak (profiler) | tensor peak / plan |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, m in r["modes"].items():
        lines.append(f"| {mode} | {_mib(m['peak_memory_bytes'])} | "
                     f"{_mib(m['plan'].get('predicted_peak_bytes'))} | "
                     f"{_ratio(m.get('measured_over_plan'))} | "
                     f"{_mib(max(m['resident_bytes_per_rank']))} | "
                     f"{_mib(m.get('tensor_peak_bytes'))} | "
                     f"{_ratio(m.get('tensor_peak_over_plan'))} |")
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """Tokens/s, the step's breakdown and peak memory against the plan, per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(record["modes"])
    fig, (rate_ax, time_ax, memory_ax) = plt.subplots(1, 3, figsize=(15, 4.5))
    rate_ax.bar(modes, [record["modes"][m]["tokens_per_s"] for m in modes], color="tab:blue")
    rate_ax.set_ylabel("tokens/s (all ranks)")
    rate_ax.set_title("throughput")
    bottom = [0.0] * len(modes)
    for phase in PHASES:
        heights = [record["modes"][m]["breakdown_mean_s"][phase] * 1000 for m in modes]
        time_ax.bar(modes, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    time_ax.set_ylabel("ms per step (mean)")
    time_ax.set_title("step breakdown")
    time_ax.legend(fontsize=7)
    x = range(len(modes))
    measured = [record["modes"][m]["peak_memory_bytes"] / MIB for m in modes]
    planned = [(record["modes"][m]["plan"].get("predicted_peak_bytes") or 0) / MIB for m in modes]
    memory_ax.bar([i - 0.2 for i in x], measured, width=0.4, label="measured")
    memory_ax.bar([i + 0.2 for i in x], planned, width=0.4, label="plan")
    memory_ax.set_xticks(list(x), modes)
    memory_ax.set_ylabel("MiB per rank")
    memory_ax.set_title("peak memory")
    memory_ax.legend(fontsize=7)
    for ax in (rate_ax, time_ax, memory_ax):
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"{record['model']['parameters'] / 1e6:.1f}M params, {record['world_size']} "
                 f"rank(s), {record['nodes']} node(s), {record['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(record: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "throughput.json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown_table(record)
    (out_dir / "throughput.md").write_text(table)
    plot(record, out_dir / "throughput.png")
    print(table, flush=True)
    print(f"[throughput] wrote {out_dir}/throughput.json, throughput.md, throughput.png",
          flush=True)


# ----- main --------------------------------------------------------------------------------

def build_record(args, built, states, memory, predictions, world_size, micro_batch,
                 config, rank_memory, hosts, on_cuda: bool, load_at_start: list) -> dict:
    """The run's JSON record (rank 0); the load averages say how busy the machine was."""
    dims = model_dims(config)
    parameters, embedding = parameter_counts(built)
    flops = flops_per_token(dims, parameters, embedding, args.seq_len)
    tokens_per_rank_step = 2 * args.accum * micro_batch * args.seq_len
    device_name = torch.cuda.get_device_name() if on_cuda else cpu_name()
    peak = args.peak_flops or (peak_flops(device_name) if on_cuda else None)
    nodes, nodes_source = node_count(world_size)
    modes = {}
    for index, state in enumerate(states):
        entry = summarize_mode(state, args.warmup, tokens_per_rank_step, world_size)
        entry["peak_memory_bytes_per_rank"] = [row[3 * index] for row in rank_memory]
        entry["resident_bytes_per_rank"] = [row[3 * index + 1] for row in rank_memory]
        entry["peak_memory_bytes"] = max(entry["peak_memory_bytes_per_rank"])
        entry["plan"] = predictions[state.mode]
        predicted = entry["plan"].get("predicted_peak_bytes")
        entry["measured_over_plan"] = entry["peak_memory_bytes"] / predicted if predicted else None
        if args.profile_memory and not on_cuda:
            entry["tensor_peak_bytes_per_rank"] = [row[3 * index + 2] for row in rank_memory]
            entry["tensor_peak_bytes"] = max(entry["tensor_peak_bytes_per_rank"])
            entry["tensor_peak_over_plan"] = (entry["tensor_peak_bytes"] / predicted
                                              if predicted else None)
        entry["mfu"] = flops * entry["tokens_per_s_per_rank"] / peak if peak else None
        modes[state.mode] = entry
    return {
        "benchmark": "throughput", "created": datetime.now(timezone.utc).isoformat(),
        "command": sys.argv, "world_size": world_size, "nodes": nodes,
        "nodes_source": nodes_source, "hosts": len(set(hosts)), "ranks_per_node": local_size(),
        "device": "cuda" if on_cuda else "cpu", "device_name": device_name,
        "backend": dist.get_backend(), "torch_threads": torch.get_num_threads(),
        "scaling": args.scaling, "micro_batch_size": micro_batch, "accum": args.accum,
        "seq_len": args.seq_len, "global_batch": micro_batch * args.accum * world_size,
        "tokens_per_step_per_rank": tokens_per_rank_step,
        "tokens_per_step": tokens_per_rank_step * world_size,
        "precision": "bf16" if args.bf16 else "fp32",
        "gradient_checkpointing": args.gradient_checkpointing, "steps": args.steps,
        "warmup": args.warmup, "block": args.block, "adaptive_period": args.period,
        "model": {**dims, "parameters": parameters, "input_embedding_parameters": embedding,
                  "flops_per_token": flops, "source": args.model or args.config or "flags"},
        "load_average": {"start": load_at_start, "end": list(os.getloadavg())},
        "peak_flops": peak, "memory_method": memory.method,
        "memory_baseline_bytes": memory.baseline,
        "modes": modes,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world_size = init_distributed()
    micro_batch = micro_batch_for(args, world_size, rank)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = model_config(args)
    model_dir = prepare_model(args, config, dtype)
    shape = SimpleNamespace(vocab_size=config["vocab_size"], micro_batch_size=micro_batch,
                            seq_len=args.seq_len, accum=args.accum)
    tasks = (RandomTask(shape, 0), RandomTask(shape, 1))
    ds_config = deepspeed_config(args, micro_batch, world_size)
    on_cuda = torch.cuda.is_available()
    import_what_the_build_loads(config)
    gc.collect()
    return_free_heap()
    memory = PeakMemory("cuda" if on_cuda else "cpu")  # the baseline: before the model
    built = build_engine(model_dir, ds_config,
                         MemorySettings(gradient_checkpointing=args.gradient_checkpointing))
    timer = PhaseTimer()
    instrument(built, timer)
    # a fixed probe cost per period: random tokens would make the rise budget's backtracks
    # and refits a property of the random data, not of the engine
    rate = AdaptiveRate(AdaptiveLRConfig(period=args.period, max_rise=0.0,
                                         refit_when_far=False), LR, tasks[0], tasks[1], METHOD,
                        SilentLog())
    states = [ModeState(mode, rate if mode == "ngdiff_adaptive" else None)
              for mode in MODES if mode in args.modes]
    if rank == 0:
        print(f"[throughput] {world_size} rank(s), micro-batch {micro_batch} x {args.seq_len}, "
              f"K={args.accum}, modes {', '.join(s.mode for s in states)}; model {model_dir}",
              flush=True)
    load_at_start = list(os.getloadavg())
    run_rounds(built, states, tasks, args, timer, memory, rank)
    if args.profile_memory and not on_cuda:
        profile_tensor_peaks(built, states, tasks, data_step=10 ** 6)
    rank_memory = gather_per_rank([v for s in states for v in (s.peak, s.resident, s.tensor_peak)],
                                  built.device)
    hosts = all_hostnames(world_size)
    if rank == 0:
        predictions = plan_predictions(model_dir, args, micro_batch, world_size,
                                       ds_config["zero_optimization"], on_cuda)
        record = build_record(args, built, states, memory, predictions, world_size, micro_batch,
                              config, rank_memory, hosts, on_cuda, load_at_start)
        write_outputs(record, Path(args.output_dir))
    leave_distributed()


if __name__ == "__main__":
    main()
    exit_past_teardown(0)
