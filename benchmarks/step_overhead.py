"""Step time and memory of NGDiff against the plain ZeRO-3 floor, side by side in one run.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 benchmarks/step_overhead.py
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/step_overhead.py
    deepspeed --num_gpus 8 benchmarks/step_overhead.py --hidden-size 2048 --layers 16 --seq-len 512

(a) floor: stock DeepSpeed ZeRO-3 doing the same forward/backward work — K forget and K
    retain micro-batches accumulated with gradient_accumulation_steps = 2K, one optimizer
    step (same compute, same reduce-scatters, no NGDiff);
(b) the NGDiff step (ngdiff_ds.trainer.ngdiff_step) on the same model, data and optimizer;
(c) NGDiff with the adaptive rate, probing after every step (phi = 1) and after every
    --period-th step (the default phi = 8), on the next step's retain batch as in training.

Both engines are built up front and timed in alternating blocks, so drift in machine load
hits all alike. Printed: median step times and their ratio (target <= 1.05); mean step times
(fits included) with the adaptive rate against plain NGDiff (target <= 1.15 at the default
phi); the extra
memory NGDiff keeps (the forget-gradient copy, target <= 1 gradient partition) and, on
CUDA, each mode's peak memory above what was allocated when its step began.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ngdiff_ds.adaptive_lr import AdaptiveLRConfig  # noqa: E402
from ngdiff_ds.combine import COMBINE_RULES  # noqa: E402
from ngdiff_ds.config import BatchLayout, engine_config  # noqa: E402
from ngdiff_ds.distributed import init_distributed, leave_distributed  # noqa: E402
from ngdiff_ds.errors import exit_past_teardown  # noqa: E402
from ngdiff_ds.engine import build_engine  # noqa: E402
from ngdiff_ds.losses import FORGET_LOSSES, RETAIN_LOSSES  # noqa: E402
from ngdiff_ds.lr_probe import probe_losses  # noqa: E402
from ngdiff_ds.trainer import Method, ngdiff_step  # noqa: E402

METHOD = Method(forget_loss=FORGET_LOSSES.bind("ga"), retain_loss=RETAIN_LOSSES.bind("nll"),
                combine_rule=COMBINE_RULES.bind("ngdiff"))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--accum", type=int, default=1, help="K micro-batches per task per step")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--block", type=int, default=8,
                        help="steps per alternating block (a multiple of --period)")
    parser.add_argument("--period", type=int, default=AdaptiveLRConfig().period,
                        help="default phi of the adaptive rate")
    parser.add_argument("--optimizer", default="AdamW", choices=["AdamW", "SGD"])
    parser.add_argument("--bf16", action="store_true")
    return parser.parse_args()


def make_model_dir(args, rank) -> str:
    """A random Llama of the requested size, written once by rank 0 (shared temp dir)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ngdiff_ds.engine import barrier

    path = Path(tempfile.gettempdir()) / (f"ngdiff_bench_h{args.hidden_size}_l{args.layers}"
                                          f"_v{args.vocab_size}")
    if rank == 0 and not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                             intermediate_size=args.hidden_size * 4, num_hidden_layers=args.layers,
                             num_attention_heads=max(1, args.hidden_size // 64),
                             max_position_embeddings=max(128, args.seq_len), tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    barrier()
    return str(path)


def random_batches(args, rank, count, seed):
    """``count`` micro-batches of token ids; the first half of each sequence is the "question"."""
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    batches = []
    for _ in range(count):
        ids = torch.randint(4, args.vocab_size, (args.micro_batch_size, args.seq_len), generator=generator)
        labels = ids.clone()
        labels[:, : args.seq_len // 2] = -100
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return batches


def floor_step(built, forget_batches, retain_batches):
    """Stock ZeRO-3: 2K micro-batches accumulated by DeepSpeed, one optimizer step."""
    engine = built.engine
    for loss_fn, batches in ((METHOD.forget_loss, forget_batches), (METHOD.retain_loss, retain_batches)):
        for batch in batches:
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            engine.backward(loss_fn(logits, batch))
            engine.step()  # a no-op except at the accumulation boundary


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    args = parse_args()
    rank, world_size = init_distributed()
    model_dir = make_model_dir(args, rank)
    optimizer = {"type": args.optimizer,
                 "params": {"lr": 1e-5, "torch_adam": True} if args.optimizer == "AdamW" else {"lr": 1e-5}}
    base = {"train_micro_batch_size_per_gpu": args.micro_batch_size, "zero_optimization": {"stage": 3},
            "optimizer": optimizer, "bf16": {"enabled": args.bf16}}
    if args.bf16:
        base["data_types"] = {"grad_accum_dtype": "fp32"}
    layout = BatchLayout(args.micro_batch_size, args.accum, world_size)
    ngdiff_config = engine_config(base, layout)
    floor_config = dict(ngdiff_config, gradient_accumulation_steps=2 * args.accum,
                        train_batch_size=2 * args.accum * args.micro_batch_size * world_size)

    floor = build_engine(model_dir, floor_config)
    ngdiff = build_engine(model_dir, ngdiff_config)
    device = ngdiff.engine.device
    forget_grad = torch.empty_like(ngdiff.partitions.flat_grad)

    def batches(step):
        to = lambda bs: [{k: v.to(device) for k, v in b.items()} for b in bs]  # noqa: E731
        return (to(random_batches(args, rank, args.accum, 2 * step)),
                to(random_batches(args, rank, args.accum, 2 * step + 1)))

    multiples = AdaptiveLRConfig().multiples

    def gen_step(f, r, step, period, next_retain):
        fit = step % period == 0
        ngdiff_step(ngdiff, f, r, METHOD, 1e-5, forget_grad, step, keep_step_delta=fit)
        if fit:
            probe_losses(ngdiff, forget_grad, multiples, [(next_retain, METHOD.retain_loss)])

    runs = {
        "floor": lambda f, r, step, nxt: floor_step(floor, f, r),
        "ngdiff": lambda f, r, step, nxt: ngdiff_step(ngdiff, f, r, METHOD, 1e-5, forget_grad,
                                                      step),
        "gen_phi1": lambda f, r, step, nxt: gen_step(f, r, step, 1, nxt),
        f"gen_phi{args.period}": lambda f, r, step, nxt: gen_step(f, r, step, args.period, nxt),
    }
    times = {mode: [] for mode in runs}
    peaks = {mode: [] for mode in runs}
    total = args.warmup + args.steps
    step = 0
    while min(len(v) for v in times.values()) < total:
        for mode in runs:
            for i in range(args.block):
                forget_batches, retain_batches = batches(step + i)
                next_retain = batches(step + i + 1)[1]  # probe data, built outside the timing
                synchronize()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                    start_memory = torch.cuda.memory_allocated()
                start = time.perf_counter()
                runs[mode](forget_batches, retain_batches, step + i, next_retain)
                synchronize()
                times[mode].append(time.perf_counter() - start)
                if torch.cuda.is_available():
                    peaks[mode].append(torch.cuda.max_memory_allocated() - start_memory)
        step += args.block

    if rank != 0:
        return
    median = {mode: statistics.median(v[args.warmup:total]) for mode, v in times.items()}
    mean = {mode: statistics.mean(v[args.warmup:total]) for mode, v in times.items()}
    partition_bytes = ngdiff.partitions.flat_grad.numel() * ngdiff.partitions.flat_grad.element_size()
    extra_bytes = forget_grad.numel() * forget_grad.element_size()
    params = sum(p.ds_numel for p in ngdiff.model.parameters())
    print(f"model: {params / 1e6:.1f}M params, {world_size} rank(s) on {device}, micro-batch "
          f"{args.micro_batch_size} x {args.seq_len} tokens, K={args.accum}, {args.optimizer}, "
          f"{'bf16' if args.bf16 else 'fp32'}; {args.steps} timed steps per mode")
    print(f"median step time  floor {median['floor'] * 1000:8.1f} ms | ngdiff "
          f"{median['ngdiff'] * 1000:8.1f} ms | ratio ngdiff/floor {median['ngdiff'] / median['floor']:.3f}")
    for mode in (m for m in runs if m.startswith("gen_")):
        print(f"adaptive rate {mode[4:]:>5s}: mean step {mean[mode] * 1000:8.1f} ms vs NGDiff "
              f"{mean['ngdiff'] * 1000:8.1f} ms | ratio {mean[mode] / mean['ngdiff']:.3f}")
    print(f"extra memory kept by NGDiff: {extra_bytes / 2**20:.2f} MiB = "
          f"{extra_bytes / partition_bytes:.2f} x this rank's gradient partition")
    if peaks["floor"]:
        peak = {mode: max(v[args.warmup:total]) for mode, v in peaks.items() if mode in ("floor", "ngdiff")}
        print(f"peak memory above step start  floor {peak['floor'] / 2**20:.1f} MiB | ngdiff "
              f"{peak['ngdiff'] / 2**20:.1f} MiB | difference "
              f"{(peak['ngdiff'] - peak['floor']) / partition_bytes:+.2f} gradient partitions")
    else:
        print("peak memory during a step: measured on CUDA only (torch does not track CPU allocations)")


if __name__ == "__main__":
    main()
    leave_distributed()
    exit_past_teardown(0)
