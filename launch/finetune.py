"""Plain fine-tuning through ZeRO-3 on TOFU-schema QA splits (loss on the answers) and text
splits (loss on every token), trained on together.

This is how the embedded default's models are made; use it to fine-tune your own model on
your own data before unlearning:

    deepspeed launch/finetune.py --deepspeed ds_configs/zero3.json \
        --model /models/base --data /data/tofu --splits full --steps 500 --output-dir runs/ft

CPU only:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py --deepspeed ds_configs/zero3.json \
        --model MODEL_DIR --data DATA_DIR --splits full world_facts --steps 200
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ngdiff_ds.cli import add_common_arguments, env_rank, fail, model_max_length  # noqa: E402
from ngdiff_ds.config import ConfigError, engine_config, read_json, validate_ds_config  # noqa: E402
from ngdiff_ds.data.qa import DataError, StepBatches, encode_split, load_training_records  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--splits", nargs="+", default=["full"],
                        help="splits trained on together: QA splits (answers) and text splits (every token)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--output-dir", default="runs/finetune")
    args = parser.parse_args()
    rank = env_rank()
    if args.model is None or args.data is None:
        fail("launch/finetune.py needs --model and --data", rank)
    try:
        raw_config = read_json(args.deepspeed)
    except ConfigError as err:
        fail(str(err), rank)

    from ngdiff_ds.engine import ModelError, build_engine, init_distributed, load_tokenizer, resolve_model, save_hf_model
    from ngdiff_ds.run_log import RunLog
    from ngdiff_ds.trainer import TaskData, run_finetune
    from ngdiff_ds.zero3 import UnsupportedDeepSpeed

    try:
        rank, world_size = init_distributed(args.dist_timeout_minutes)
        log = RunLog(args.output_dir, rank)
        layout = validate_ds_config(raw_config, args.deepspeed, world_size,
                                    args.micro_batch_size, args.grad_accum_steps)
        model = resolve_model(args.model)
        tokenizer = load_tokenizer(model)
        max_length = model_max_length(model, args.max_length, log)
        records = load_training_records(args.data, "+".join(args.splits))
        examples, truncated = encode_split(tokenizer, records, max_length, "+".join(args.splits))
        batches = StepBatches(len(examples), layout.micro_batch_size, layout.micro_batches_per_step,
                              world_size, args.seed)
        built = build_engine(model, engine_config(raw_config, layout))
    except (ConfigError, DataError, ModelError, UnsupportedDeepSpeed) as err:
        fail(str(err), rank)
    if truncated:
        log.print(f"warning: {truncated} examples were truncated to {max_length} tokens")
    data = TaskData(name="finetune", examples=examples, batches=batches, pad_token_id=tokenizer.pad_token_id)
    lr = built.engine.optimizer.param_groups[0]["lr"]
    loss = run_finetune(built, data, args.steps, lr, log, rank, warmup_steps=args.warmup_steps)
    log.print(f"final training loss {loss:.4f}")
    save_hf_model(built, tokenizer, Path(args.output_dir) / "model")
    log.close()


if __name__ == "__main__":
    main()
