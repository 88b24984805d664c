"""TOFU and MUSE metrics of a saved model, sharded over the ranks of a ZeRO-3 engine.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/evaluate.py --deepspeed ds_configs/zero3.json \
        --model runs/ngdiff/model --data ~/.cache/ngdiff_ds/default-v3/data \
        --retain-model ~/.cache/ngdiff_ds/default-v3/model_retain90 --output-dir runs/eval

    deepspeed --num_gpus 8 launch/evaluate.py --deepspeed ds_configs/zero3_bf16.json \
        --model runs/7b-f10/model --data /data/tofu --retain-results retain90_results.json

Writes <output-dir>/model_results.json (per example, open-unlearning schema) and
model_summary.json, and prints the table (with the reference model's column when given).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ngdiff_ds.cli import (add_common_arguments, add_evaluation_arguments,  # noqa: E402
                           check_evaluation_arguments, env_rank, evaluation_settings, fail,
                           model_max_length)
from ngdiff_ds.config import ConfigError, engine_config, read_json, validate_ds_config  # noqa: E402
from ngdiff_ds.data.qa import DataError  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--forget-split", default="forget10")
    parser.add_argument("--retain-split", default="retain90")
    add_evaluation_arguments(parser)
    parser.add_argument("--output-dir", default="runs/eval")
    args = parser.parse_args()
    rank = env_rank()
    if args.model is None or args.data is None:
        fail("launch/evaluate.py needs --model and --data", rank)
    try:
        raw_config = read_json(args.deepspeed)
        check_evaluation_arguments(args)
    except ConfigError as err:
        fail(str(err), rank)

    from ngdiff_ds.engine import ModelError, build_engine, init_distributed, load_tokenizer, resolve_model
    from ngdiff_ds.eval.report import format_table, write_results
    from ngdiff_ds.eval.suite import Reference, evaluate_model, load_eval_sets, truncated_texts_note
    from ngdiff_ds.run_log import RunLog
    from ngdiff_ds.zero3 import UnsupportedDeepSpeed

    try:
        rank, world_size = init_distributed(args.dist_timeout_minutes)
        layout = validate_ds_config(raw_config, args.deepspeed, world_size, args.micro_batch_size,
                                    args.grad_accum_steps)
        log = RunLog(args.output_dir, rank, tensorboard=False)
        model = resolve_model(args.model)
        tokenizer = load_tokenizer(model)
        max_length = model_max_length(model, args.max_length, log)
        names, options = evaluation_settings(args, args.forget_split, args.retain_split, max_length)
        sets = load_eval_sets(args.data, names, note=log.print)
        if note := truncated_texts_note(tokenizer, sets, max_length):
            log.print(note)
        reference = Reference.from_file(args.retain_results) if args.retain_results else None
        retain_model = resolve_model(args.retain_model) if args.retain_model else None
        ds_config = engine_config(raw_config, layout)
    except (ConfigError, DataError, ModelError, UnsupportedDeepSpeed, ValueError) as err:
        fail(str(err), rank)

    columns = {}
    if retain_model:
        built = build_engine(retain_model, ds_config)
        reference_results = evaluate_model(built.engine, tokenizer, sets, rank, world_size, None, options)
        reference = Reference.from_results(reference_results)
        columns["retain_model"] = write_results(reference_results, args.output_dir, "retain_model") \
            if rank == 0 else {}
        del built
    built = build_engine(model, ds_config)
    results = evaluate_model(built.engine, tokenizer, sets, rank, world_size, reference, options)
    if rank == 0:
        columns["model"] = write_results(results, args.output_dir, "model")
        print(format_table(columns), flush=True)
        print(f"results written to {args.output_dir}", flush=True)


if __name__ == "__main__":
    main()
