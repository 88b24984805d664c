"""Command-line plumbing shared by the launch scripts: arguments, data loading, clean failures."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ngdiff_ds.config import BatchLayout, ConfigError
from ngdiff_ds.data.qa import StepBatches, encode_split, load_training_records
from ngdiff_ds.run_log import RunLog
from ngdiff_ds.trainer import TaskData

# Exit code of a run refused for bad input (config, data, model); tracebacks are not shown.
EXIT_BAD_INPUT = 2


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    # deepspeed.add_config_arguments would make --deepspeed a flag; we take a path instead.
    parser.add_argument("--deepspeed", required=True, metavar="JSON",
                        help="DeepSpeed config (ZeRO stage 3), e.g. ds_configs/zero3.json")
    # -1 by default: under plain mpirun a default of 0 would make every rank claim device 0.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None,
                        help="local HF model directory or hub id (default: the embedded tiny Llama)")
    parser.add_argument("--data", default=None,
                        help="directory of TOFU-schema split files, a file, or a `datasets` name "
                             "(default: the embedded synthetic benchmark)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the embedded default is built and cached "
                             "(default: $NGDIFF_DS_CACHE or ~/.cache/ngdiff_ds)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per example (default: 256, or the model's "
                             "max_position_embeddings if smaller); longer answers are truncated "
                             "with a warning")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="must agree with train_micro_batch_size_per_gpu when the JSON sets it")
    parser.add_argument("--grad-accum-steps", type=int, default=None,
                        help="micro-batches per task per step; must agree with the JSON's "
                             "gradient_accumulation_steps when it sets one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dist-timeout-minutes", type=float, default=30.0,
                        help="a collective waiting longer than this fails the job instead of hanging")


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """The TOFU and MUSE evaluation flags (launch/unlearn.py and launch/evaluate.py)."""
    group = parser.add_argument_group("TOFU and MUSE evaluation")
    group.add_argument("--eval-batch-size", type=int, default=32)
    group.add_argument("--wf-split", default="world_facts",
                       help="general-fact split for model utility (skipped if the data lacks it)")
    group.add_argument("--eval-retain-size", type=int, default=200,
                       help="retain examples scored (the first N of the split)")
    group.add_argument("--max-new-tokens", type=int, default=48,
                       help="greedy answer length for TOFU ROUGE and MUSE KnowMem")
    group.add_argument("--no-muse", dest="muse_eval", action="store_false",
                       help="skip the MUSE text metrics (VerbMem, Min-K%% AUC, PrivLeak)")
    group.add_argument("--verbmem-split", default=None,
                       help="prompt/gt records for VerbMem (default: <forget split>_verbmem)")
    group.add_argument("--forget-text-split", default=None,
                       help="forget texts for the Min-K%% test (default: <forget split>_text)")
    group.add_argument("--holdout-split", default="holdout_text",
                       help="texts no model trained on: the non-members of the Min-K%% test")
    group.add_argument("--verbmem-max-new-tokens", type=int, default=128)
    group.add_argument("--retain-model", default=None,
                       help="retain-only model: the forget quality and PrivLeak reference")
    group.add_argument("--retain-results", default=None,
                       help="a saved results JSON of the retain-only model instead of --retain-model")


def check_evaluation_arguments(args) -> None:
    """Raise ConfigError naming the first evaluation flag out of range."""
    for flag, value in (("--eval-batch-size", args.eval_batch_size),
                        ("--eval-retain-size", args.eval_retain_size),
                        ("--max-new-tokens", args.max_new_tokens),
                        ("--verbmem-max-new-tokens", args.verbmem_max_new_tokens)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")


def evaluation_settings(args, forget_split: str, retain_split: str, max_length: int):
    """(SplitNames, EvalOptions) from the evaluation flags."""
    from ngdiff_ds.eval.suite import EvalOptions, SplitNames

    names = SplitNames(forget=forget_split, retain=retain_split, wf=args.wf_split,
                       verbmem=args.verbmem_split, forget_text=args.forget_text_split,
                       holdout_text=args.holdout_split, retain_size=args.eval_retain_size,
                       muse=args.muse_eval)
    options = EvalOptions(max_length=max_length, batch_size=args.eval_batch_size,
                          max_new_tokens=args.max_new_tokens,
                          verbmem_max_new_tokens=args.verbmem_max_new_tokens)
    return names, options


def first_split(splits: str) -> str:
    """The first of ``a+b`` splits: the one evaluation is named after."""
    return splits.split("+")[0]


def tofu_retain_split(forget_split: str) -> str:
    """forget10 -> retain90, forget05_text -> retain95_text, for each part of ``a+b``."""
    parts = []
    for part in forget_split.split("+"):
        percent, _, suffix = part.removeprefix("forget").partition("_")
        if not part.startswith("forget") or not percent.isdigit():
            raise ConfigError(f"cannot infer the retain split of {part!r}; pass --retain-split")
        parts.append(f"retain{100 - int(percent):02d}" + (f"_{suffix}" if suffix else ""))
    return "+".join(parts)


def load_task(name: str, data: str, split: str, tokenizer, max_length: int, layout: BatchLayout,
              seed: int, log: RunLog) -> TaskData:
    """Load, validate and tokenise one split (or ``a+b``: several, concatenated); batches are
    drawn per step and rank."""
    records = load_training_records(data, split)
    examples, truncated = encode_split(tokenizer, records, max_length, split)
    if truncated:
        log.print(f"warning: {truncated} of {len(examples)} examples of split {split!r} were longer "
                  f"than --max-length {max_length} and were cut from the end (answers or texts)")
    batches = StepBatches(len(examples), layout.micro_batch_size, layout.micro_batches_per_step,
                          layout.world_size, seed)
    return TaskData(name=name, examples=examples, batches=batches,
                    pad_token_id=tokenizer.pad_token_id)


DEFAULT_MAX_LENGTH = 256


def model_max_length(model: str, requested: int | None, log: RunLog) -> int:
    """``requested`` (None: the default) capped at what the model's positions allow; only an
    explicit request above the limit is warned about."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    if requested < 1:
        raise ConfigError(f"--max-length must be at least 1, got {requested}")
    if limit is not None and requested > limit:
        log.print(f"warning: --max-length {requested} exceeds the model's max_position_embeddings "
                  f"{limit}; sequences are truncated to {limit} tokens")
        return limit
    return requested


def default_cache_dir(cli_value: str | None) -> Path:
    if cli_value:
        return Path(cli_value).expanduser()
    return Path(os.environ.get("NGDIFF_DS_CACHE", "~/.cache/ngdiff_ds")).expanduser()


def fail(message: str, rank: int) -> None:
    """Exit with EXIT_BAD_INPUT; rank 0 prints the message (every rank hits the same check)."""
    if rank <= 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def env_rank() -> int:
    """This process's rank before the process group exists (launchers export RANK)."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0
