"""NGDiff unlearning on DeepSpeed ZeRO-3.

Run (embedded default: synthetic TOFU-style benchmark + tiny Llama, built on first use):

    deepspeed launch/unlearn.py --deepspeed ds_configs/zero3.json

On CPU only (no GPU):

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/unlearn.py --deepspeed ds_configs/zero3.json

Your own model and TOFU-schema data:

    deepspeed --num_gpus 8 launch/unlearn.py --deepspeed ds_configs/zero3_bf16.json \
        --model /models/llama-7b-tofu --data /data/tofu --forget-split forget10 \
        --retain-split retain90 --max-steps 100 --output-dir runs/llama7b-forget10

Writes to --output-dir: metrics.jsonl, tensorboard/, summary.json, model/ (an HF directory) and
eval/ (TOFU and MUSE results and summaries per evaluation point, the trade-off plot).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ngdiff_ds.cli import (add_common_arguments, add_evaluation_arguments, check_evaluation_arguments,  # noqa: E402
                           default_cache_dir, env_rank, evaluation_settings, fail, first_split,
                           load_task, model_max_length, tofu_retain_split)
from ngdiff_ds.adaptive_lr import AdaptiveLRConfig  # noqa: E402
from ngdiff_ds.combine import COMBINE_RULES  # noqa: E402
from ngdiff_ds.config import ConfigError, UnlearnSettings, engine_config, read_json, validate_ds_config  # noqa: E402
from ngdiff_ds.data.qa import DataError  # noqa: E402
from ngdiff_ds.losses import FORGET_LOSSES  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--forget-split", default=None,
                        help="split(s) to unlearn; several joined by '+' are concatenated, QA "
                             "and text splits alike (default: forget10, and on the embedded "
                             "default forget10+forget10_text: the QA pairs and the passages)")
    parser.add_argument("--retain-split", default=None,
                        help="default: the TOFU complement of each --forget-split part "
                             "(forget10 -> retain90, forget10_text -> retain90_text)")
    parser.add_argument("--output-dir", default="runs/ngdiff")
    parser.add_argument("--max-steps", type=int, default=UnlearnSettings.max_steps)
    parser.add_argument("--lr", type=float, default=None, help="default: optimizer.params.lr of the JSON")
    parser.add_argument("--combine", choices=sorted(COMBINE_RULES), default="ngdiff")
    parser.add_argument("--forget-loss", choices=sorted(FORGET_LOSSES), default="ga")
    parser.add_argument("--log-every", type=int, default=1)
    rate = parser.add_argument_group("adaptive learning rate (GeN parabola fit; on by default)")
    defaults = AdaptiveLRConfig()
    rate.add_argument("--no-adaptive-lr", dest="adaptive_lr", action="store_false",
                      help="keep the learning rate fixed (times --lr-schedule)")
    rate.add_argument("--lr-period", type=int, default=defaults.period,
                      help="phi: fit the rate every this many steps")
    rate.add_argument("--probe-loss", choices=["retain", "forget", "both"], default=defaults.probe_loss)
    rate.add_argument("--probe-multiples", type=float, nargs="+", default=list(defaults.multiples),
                      help="step multiples s where the probe loss is measured (must include 0)")
    rate.add_argument("--lr-smoothing", type=float, default=defaults.smoothing,
                      help="beta in lr <- (1-beta) lr + beta clip(s* lr)")
    rate.add_argument("--lr-clip", type=float, nargs=2, default=[defaults.clip_low, defaults.clip_high],
                      metavar=("LOW", "HIGH"), help="proposal clipped to [LOW lr, HIGH lr]")
    rate.add_argument("--lr-warmup-steps", type=int, default=defaults.warmup_steps,
                      help="steps before the first fit")
    rate.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default=defaults.schedule,
                      help="factor multiplied on the fitted rate, decaying over --max-steps")
    rate.add_argument("--lr-min-factor", type=float, default=defaults.min_schedule_factor,
                      help="final value of the linear/cosine schedule factor")
    evaluation = parser.add_argument_group("when to evaluate")
    evaluation.add_argument("--eval-every", type=int, default=0,
                            help="evaluate before, every this many steps, and after (0: only "
                                 "before and after)")
    evaluation.add_argument("--no-eval", dest="evaluate", action="store_false",
                            help="skip all metrics (the training-target NLL is still reported)")
    add_evaluation_arguments(parser)
    return parser.parse_args()


class RunEvaluation:
    """The TOFU and MUSE metrics of this run: the retain-only reference once, then each
    evaluation point; results files, TensorBoard scalars, the table and the trade-off plot."""

    def __init__(self, args, data, forget_split, retain_split, tokenizer, max_length, raw_config,
                 layout, rank, world_size, log, default_retain_model):
        from ngdiff_ds.eval.suite import Reference, load_eval_sets, truncated_texts_note

        self.rank, self.world_size, self.log, self.tokenizer = rank, world_size, log, tokenizer
        self.out_dir = Path(args.output_dir) / "eval"
        names, self.options = evaluation_settings(args, forget_split, retain_split, max_length)
        self.sets = load_eval_sets(data, names, note=log.print)
        if note := truncated_texts_note(tokenizer, self.sets, max_length):
            log.print(note)
        self.points, self.columns = [], {}
        self.reference = None
        if args.retain_results:
            self.reference = Reference.from_file(args.retain_results)
        elif args.retain_model or default_retain_model:
            self._evaluate_reference(args.retain_model or default_retain_model, raw_config, layout)

    def _evaluate_reference(self, model, raw_config, layout):
        from ngdiff_ds.config import engine_config
        from ngdiff_ds.engine import build_engine, resolve_model
        from ngdiff_ds.eval.suite import Reference

        reference = build_engine(resolve_model(model), engine_config(raw_config, layout))
        results = self._evaluate(reference.engine, None)
        self.reference = Reference.from_results(results)
        self._record("retain_model", results, None)
        del reference

    def _evaluate(self, engine, reference):
        from ngdiff_ds.eval.suite import evaluate_model

        return evaluate_model(engine, self.tokenizer, self.sets, self.rank, self.world_size,
                              reference, self.options)

    def _record(self, tag, results, step):
        from ngdiff_ds.eval.report import write_results

        if self.rank == 0:
            summary = write_results(results, self.out_dir, tag)
        else:
            from ngdiff_ds.eval.metrics import summary as summarise, to_results

            summary = summarise(to_results(results))
        self.columns[tag] = summary
        if step is not None:
            self.log.record("unlearning_metrics", step, summary)
            self.points.append({"label": tag, **summary})
        return summary

    def run(self, engine, tag, step):
        summary = self._record(tag, self._evaluate(engine, self.reference), step)
        self.log.print(f"metrics @ {tag}: " + ", ".join(
            f"{k} {summary[k]:.4g}" for k in ("forget_quality", "model_utility", "forget_Q_A_ROUGE",
                                               "forget_verbmem_ROUGE", "privleak")
            if k in summary))

    def finish(self):
        from ngdiff_ds.eval.report import format_table, plot_trajectory

        self.log.print("\nTOFU and MUSE metrics (one column per model or evaluation point):\n"
                       + format_table(self.columns))
        if self.rank == 0:
            plot_trajectory(self.points, self.out_dir / "forget_quality_vs_utility.png")


def main():
    args = parse_args()
    rank = env_rank()
    try:
        raw_config = read_json(args.deepspeed)
        if args.forget_split is None:
            args.forget_split = "forget10+forget10_text" if args.model is None else "forget10"
        retain_split = args.retain_split or tofu_retain_split(args.forget_split)
        for flag, value in (("--max-steps", args.max_steps), ("--log-every", args.log_every)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        check_evaluation_arguments(args)
        if args.lr is not None and not args.lr > 0:
            raise ConfigError(f"--lr must be positive, got {args.lr}")
        if (args.model is None) != (args.data is None):
            raise ConfigError("pass both --model and --data, or neither (the embedded default); "
                              "the default model only knows the default data and vice versa")
        adaptive = AdaptiveLRConfig(
            enabled=args.adaptive_lr, period=args.lr_period, probe_loss=args.probe_loss,
            multiples=args.probe_multiples, smoothing=args.lr_smoothing, clip_low=args.lr_clip[0],
            clip_high=args.lr_clip[1], warmup_steps=args.lr_warmup_steps, schedule=args.lr_schedule,
            total_steps=args.max_steps, min_schedule_factor=args.lr_min_factor)
        adaptive.validate()
    except (ConfigError, ValueError) as err:
        fail(str(err), rank)

    # Heavy imports after the cheap checks, so a typo fails in a second, not ten.
    from ngdiff_ds.default_assets import ensure_default_assets
    from ngdiff_ds.engine import ModelError, build_engine, init_distributed, load_tokenizer, resolve_model, save_hf_model
    from ngdiff_ds.run_log import RunLog
    from ngdiff_ds.trainer import TooManySkippedSteps, evaluate_answer_nll, run_unlearning
    from ngdiff_ds.zero3 import UnsupportedDeepSpeed

    try:
        rank, world_size = init_distributed(args.dist_timeout_minutes)
        layout = validate_ds_config(raw_config, args.deepspeed, world_size,
                                    args.micro_batch_size, args.grad_accum_steps)
    except (ConfigError, UnsupportedDeepSpeed) as err:
        fail(str(err), rank)
    log = RunLog(args.output_dir, rank)
    settings = UnlearnSettings(max_steps=args.max_steps, lr=args.lr, combine=args.combine,
                               forget_loss=args.forget_loss, seed=args.seed, log_every=args.log_every,
                               adaptive=adaptive)
    try:
        if args.model is None:
            defaults = ensure_default_assets(default_cache_dir(args.cache_dir),
                                             first_split(retain_split), rank, world_size, log)
        model = resolve_model(args.model) if args.model else defaults["model_full"]
        data = args.data or defaults["data"]
        tokenizer = load_tokenizer(model)
        max_length = model_max_length(model, args.max_length, log)
        forget = load_task("forget", data, args.forget_split, tokenizer, max_length, layout,
                           args.seed, log)
        retain = load_task("retain", data, retain_split, tokenizer, max_length, layout,
                           args.seed + 1, log)
        built = build_engine(model, engine_config(raw_config, layout))
        if adaptive.enabled and built.partitions.flat_grad.dtype != torch.float32:
            # The probes keep theta_old and the step in the gradient buffer: in bf16, noise.
            raise ConfigError(f"{args.deepspeed}: the adaptive learning rate needs fp32 gradient "
                              "accumulation; set data_types.grad_accum_dtype to \"fp32\" or pass "
                              "--no-adaptive-lr")
    except (ConfigError, DataError, ModelError, UnsupportedDeepSpeed) as err:
        fail(str(err), rank)

    log.print(f"NGDiff unlearning: model {model}, forget {args.forget_split} ({len(forget.examples)} "
              f"examples), retain {retain_split} ({len(retain.examples)}), {world_size} rank(s), global "
              f"batch {layout.global_batch_size} per task, {args.max_steps} steps, combine "
              f"{args.combine}, forget loss {args.forget_loss}")

    def answer_losses():
        return {name: evaluate_answer_nll(built, task.examples, args.eval_batch_size,
                                          tokenizer.pad_token_id, rank, world_size)
                for name, task in (("forget_nll", forget), ("retain_nll", retain))}

    evaluation = None
    if args.evaluate:
        try:
            # The QA part (the first split) is what TOFU scores; MUSE's defaults follow its name.
            evaluation = RunEvaluation(args, data, first_split(args.forget_split),
                                       first_split(retain_split), tokenizer,
                                       max_length, raw_config, layout, rank, world_size, log,
                                       defaults["model_retain"] if args.model is None else None)
        except (ConfigError, DataError, ModelError, ValueError) as err:
            fail(str(err), rank)
        evaluation.run(built.engine, "before", 0)

    before = answer_losses()
    log.record("eval", 0, {f"before_{k}": v for k, v in before.items()})
    try:
        history = run_unlearning(built, forget, retain, settings, log, rank,
                                 evaluate=(lambda step: evaluation.run(built.engine, f"step{step}", step))
                                 if evaluation else None, eval_every=args.eval_every)
    except TooManySkippedSteps as err:
        log.print(f"error: {err}")
        log.close()
        sys.exit(3)
    after = answer_losses()
    log.record("eval", args.max_steps, {f"after_{k}": v for k, v in after.items()})
    # Saved before the final evaluation, so a failing evaluation never costs the trained model.
    save_hf_model(built, tokenizer, Path(args.output_dir) / "model")
    if evaluation:
        evaluation.run(built.engine, "final", args.max_steps)
        evaluation.finish()

    summary = {"model": model, "data": data, "forget_split": args.forget_split,
               "retain_split": retain_split, "world_size": world_size,
               "global_batch_per_task": layout.global_batch_size, "steps": args.max_steps,
               "skipped_steps": sum(s.skipped for s in history),
               "adaptive_lr": settings.lr_state.to_dict() if args.adaptive_lr else None,
               "before": before, "after": after}
    if rank == 0:
        (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    log.print("NLL of the training targets (mean per example: answer tokens of QA pairs, every "
              "token of passages)   before -> after")
    for name in before:
        log.print(f"  {name:12s}  {before[name]:8.4f} -> {after[name]:8.4f}")
    log.print(f"model saved to {Path(args.output_dir) / 'model'}")
    log.close()


if __name__ == "__main__":
    main()
