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

from ngdiff_ds.cli import add_common_arguments, env_rank, fail, model_max_length  # noqa: E402
from ngdiff_ds.config import ConfigError, engine_config, read_json, validate_ds_config  # noqa: E402
from ngdiff_ds.data.qa import DataError  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--forget-split", default="forget10")
    parser.add_argument("--retain-split", default="retain90")
    parser.add_argument("--wf-split", default="world_facts")
    parser.add_argument("--eval-retain-size", type=int, default=200)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--no-muse", dest="muse", action="store_false", help="TOFU metrics only")
    parser.add_argument("--verbmem-split", default=None, help="default: <forget-split>_verbmem")
    parser.add_argument("--forget-text-split", default=None, help="default: <forget-split>_text")
    parser.add_argument("--holdout-split", default="holdout_text")
    parser.add_argument("--verbmem-max-new-tokens", type=int, default=128)
    parser.add_argument("--retain-model", default=None,
                        help="retain-only model: the forget quality and PrivLeak reference")
    parser.add_argument("--retain-results", default=None, help="or its saved results JSON")
    parser.add_argument("--output-dir", default="runs/eval")
    args = parser.parse_args()
    rank = env_rank()
    if args.model is None or args.data is None:
        fail("launch/evaluate.py needs --model and --data", rank)
    try:
        raw_config = read_json(args.deepspeed)
    except ConfigError as err:
        fail(str(err), rank)

    from ngdiff_ds.engine import ModelError, build_engine, init_distributed, load_tokenizer, resolve_model
    from ngdiff_ds.eval.suite import EvalOptions, Reference, SplitNames, evaluate_model, load_eval_sets
    from ngdiff_ds.eval.tofu import format_table, write_results
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
        names = SplitNames(forget=args.forget_split, retain=args.retain_split, wf=args.wf_split,
                           verbmem=args.verbmem_split, forget_text=args.forget_text_split,
                           holdout_text=args.holdout_split, retain_size=args.eval_retain_size,
                           muse=args.muse)
        sets = load_eval_sets(args.data, names, note=log.print)
        reference = Reference.from_file(args.retain_results) if args.retain_results else None
        ds_config = engine_config(raw_config, layout)
    except (ConfigError, DataError, ModelError, UnsupportedDeepSpeed, ValueError) as err:
        fail(str(err), rank)

    options = EvalOptions(max_length=max_length, batch_size=args.eval_batch_size,
                          max_new_tokens=args.max_new_tokens,
                          verbmem_max_new_tokens=args.verbmem_max_new_tokens)
    columns = {}
    if args.retain_model:
        built = build_engine(resolve_model(args.retain_model), ds_config)
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
