"""Why NGDiff runs two forwards per step under ZeRO-3: a shared forward cannot be backed twice.

One forward over a forget and a retain micro-batch together, then the forget backward with
``retain_graph=True`` (the forget gradient captured), then the retain backward through the
kept graph. Under ZeRO-3 the second backward fails: the first one released the gathered
weights to their partitions, and the kept graph's saved weights are empty (docs/design.md).
Prints the separate-forward gradient norms, then the outcome of the shared variant:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/shared_forward_check.py

(the embedded default's model and data; ``--model DIR --data DIR`` for others).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ngdiff_ds.config import BatchLayout, engine_config  # noqa: E402
from ngdiff_ds.data.task import load_task  # noqa: E402
from ngdiff_ds.default.assets import ensure_default_assets  # noqa: E402
from ngdiff_ds.distributed import init_distributed, leave_distributed  # noqa: E402
from ngdiff_ds.errors import exit_past_teardown  # noqa: E402
from ngdiff_ds.engine import build_engine, load_tokenizer  # noqa: E402
from ngdiff_ds.losses import FORGET_LOSSES, IGNORE_INDEX, RETAIN_LOSSES  # noqa: E402
from ngdiff_ds.run_log import RunLog  # noqa: E402

CONFIG = {"train_micro_batch_size_per_gpu": 2,
          # every parameter partitioned and released after use, as in a large model
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}


def _padded(batch: dict, length: int, pad_token_id: int) -> dict:
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {key: torch.nn.functional.pad(batch[key], (0, length - batch[key].shape[1]),
                                         value=fill[key]) for key in fill}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    rank, world_size = init_distributed(5)
    layout = BatchLayout(2, 1, world_size)
    if args.model is None:  # the embedded default (built on first use, then cached)
        log = RunLog(Path("runs/shared_forward_check"), tensorboard=False)
        assets = ensure_default_assets(Path("~/.cache/ngdiff_ds").expanduser(), "retain90", log)
        args.model, args.data = assets["model_full"], assets["data"]
    tokenizer = load_tokenizer(args.model)
    forget = load_task("forget", args.data, "forget10", tokenizer, 64, layout, 3)
    retain = load_task("retain", args.data, "retain90", tokenizer, 64, layout, 4)
    built = build_engine(args.model, engine_config(CONFIG, layout))
    engine, partitions = built.engine, built.partitions
    forget_loss, retain_loss = FORGET_LOSSES.bind("ga"), RETAIN_LOSSES.bind("nll")
    forget_batch = forget.micro_batches(0, rank, engine.device)[0]
    retain_batch = retain.micro_batches(0, rank, engine.device)[0]

    for name, batch, loss in (("forget", forget_batch, forget_loss),
                              ("retain", retain_batch, retain_loss)):
        partitions.reset_grads()
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).logits
        engine.backward(loss(logits, batch))
        print(f"rank {rank}: separate forwards: |{name} gradient slice| "
              f"{partitions.flat_grad.norm():.6g}", flush=True)

    rows = forget_batch["input_ids"].shape[0]
    length = max(forget_batch["input_ids"].shape[1], retain_batch["input_ids"].shape[1])
    both = {key: torch.cat([_padded(forget_batch, length, tokenizer.pad_token_id)[key],
                            _padded(retain_batch, length, tokenizer.pad_token_id)[key]])
            for key in ("input_ids", "labels", "attention_mask")}
    partitions.reset_grads()
    logits = engine(input_ids=both["input_ids"], attention_mask=both["attention_mask"],
                    use_cache=False).logits
    engine.backward(forget_loss(logits[:rows], {k: v[:rows] for k, v in both.items()}),
                    retain_graph=True)
    print(f"rank {rank}: shared forward: forget backward done, |slice| "
          f"{partitions.flat_grad.norm():.6g}", flush=True)
    partitions.reset_grads()
    try:
        engine.backward(retain_loss(logits[rows:], {k: v[rows:] for k, v in both.items()}))
        print(f"rank {rank}: shared forward: retain backward done, |slice| "
              f"{partitions.flat_grad.norm():.6g}", flush=True)
    except RuntimeError as error:
        print(f"rank {rank}: shared forward: the second backward fails under ZeRO-3: "
              f"{str(error).splitlines()[0]}", flush=True)


if __name__ == "__main__":
    main()
    leave_distributed()
    exit_past_teardown(0)
