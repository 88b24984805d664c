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


def load_task(name: str, data: str, split: str, tokenizer, max_length: int, layout: BatchLayout,
              seed: int, log: RunLog) -> TaskData:
    """Load, validate and tokenise one split (or ``a+b``: several, concatenated); batches are
    drawn per step and rank."""
    records = load_training_records(data, split)
    examples, truncated = encode_split(tokenizer, records, max_length, split)
    if truncated:
        log.print(f"warning: {truncated} of {len(examples)} examples of split {split!r} were longer "
                  f"than --max-length {max_length} and had their answer truncated")
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
