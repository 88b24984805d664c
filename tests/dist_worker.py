"""Runs NGDiff scenarios on ZeRO-3 for the distributed tests; launched by ``deepspeed``.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/dist_worker.py --model M --data D \
        --scenarios scenarios.json --out OUT

For every scenario and every step count in its ``save_after`` it builds a fresh engine, runs
``run_unlearning`` for that many steps (the production loop) and writes, on rank 0,
``OUT/<name>_step<N>.pt`` (the full state dict) and ``OUT/<name>_step<N>.json`` (the step stats).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ngdiff_ds.config import BatchLayout, UnlearnSettings, engine_config  # noqa: E402
from ngdiff_ds.cli import load_task  # noqa: E402
from ngdiff_ds.engine import build_engine, init_distributed, load_tokenizer  # noqa: E402
from ngdiff_ds.run_log import RunLog  # noqa: E402
from ngdiff_ds.trainer import run_unlearning  # noqa: E402
from ngdiff_ds.zero3 import consolidated_state_dict  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--scenarios", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, world_size = init_distributed(timeout_minutes=5)
    out = Path(args.out)
    tokenizer = load_tokenizer(args.model)
    log = RunLog(out / "log", rank, tensorboard=False)
    for scenario in json.loads(Path(args.scenarios).read_text()):
        layout = BatchLayout(scenario["micro"], scenario["accum"], world_size)
        ds_config = engine_config({
            "train_micro_batch_size_per_gpu": scenario["micro"],
            "zero_optimization": {"stage": 3, **scenario.get("zero", {})},
            "optimizer": scenario["optimizer"],
            "bf16": {"enabled": False},
        }, layout)
        forget = load_task("forget", args.data, "forget10", tokenizer, 64, layout, seed=3, log=log)
        retain = load_task("retain", args.data, "retain90", tokenizer, 64, layout, seed=4, log=log)
        for steps in scenario["save_after"]:
            built = build_engine(args.model, ds_config)
            settings = UnlearnSettings(max_steps=steps, combine=scenario.get("combine", "ngdiff"))
            history = run_unlearning(built, forget, retain, settings, log, rank)
            state = consolidated_state_dict(built.engine)
            if rank == 0:
                name = f"{scenario['name']}_step{steps}"
                torch.save({k: v.clone() for k, v in state.items()}, out / f"{name}.pt")
                (out / f"{name}.json").write_text(json.dumps([s.as_dict() for s in history]))
            del built
    log.close()


if __name__ == "__main__":
    main()
