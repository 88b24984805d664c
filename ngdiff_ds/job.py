"""What every launch script shares: the job's settings (DeepSpeed JSON, model, data, batch
layout, seed), joining the process group, and the run log.

    job = start_job(JobSettings(deepspeed="ds_configs/zero3.json", model=..., data=...),
                    output_dir="runs/x")
    job.layout, job.ds_config, job.log

Rank and world size come from the process group (distributed.py), not from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ngdiff_ds.config import BatchLayout, engine_config, read_json, validate_ds_config
from ngdiff_ds.errors import ConfigError
from ngdiff_ds.run_log import RunLog
from ngdiff_ds.settings import invalid, option

DEFAULT_MAX_LENGTH = 256


@dataclass
class JobSettings:
    """The flags of every launch script."""

    deepspeed: str = option(None, required=True, metavar="JSON",
                            help="DeepSpeed config (ZeRO stage 3), e.g. ds_configs/zero3.json")
    model: str | None = option(None, help="local HF model directory or hub id (default: the "
                                          "embedded tiny Llama)")
    data: str | None = option(None, help="directory of TOFU-schema split files, a file, or a "
                                         "`datasets` name (default: the embedded synthetic "
                                         "benchmark)")
    cache_dir: str | None = option(None, help="where the embedded default is built and cached "
                                              "(default: $NGDIFF_DS_CACHE or ~/.cache/ngdiff_ds)")
    max_length: int | None = option(None, help="tokens per example (default: 256, or the "
                                               "model's max_position_embeddings if smaller); "
                                               "longer answers are truncated with a warning")
    micro_batch_size: int | None = option(None, help="must agree with "
                                                     "train_micro_batch_size_per_gpu when the "
                                                     "JSON sets it")
    grad_accum_steps: int | None = option(None, help="micro-batches per task per step; must "
                                                     "agree with the JSON's "
                                                     "gradient_accumulation_steps when it sets one")
    seed: int = option(0, help="seed of the batch order (the forget task uses it, the retain "
                               "task seed + 1)")
    dist_timeout_minutes: float = option(30.0, help="a collective waiting longer than this "
                                                    "fails the job instead of hanging")

    def __post_init__(self) -> None:
        if not self.deepspeed:
            raise ConfigError("--deepspeed is required: the DeepSpeed JSON of the run")
        for name in ("max_length", "micro_batch_size", "grad_accum_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                invalid(self, name, "must be at least 1")
        if not self.dist_timeout_minutes > 0:
            invalid(self, "dist_timeout_minutes", "must be positive")

    def require_model_and_data(self, script: str) -> None:
        if self.model is None or self.data is None:
            raise ConfigError(f"{script} needs --model and --data")

    @property
    def uses_embedded_default(self) -> bool:
        """Neither --model nor --data: the embedded demo. One without the other is refused:
        the default model only knows the default data and vice versa."""
        if (self.model is None) != (self.data is None):
            raise ConfigError("pass both --model and --data, or neither (the embedded default); "
                              "the default model only knows the default data and vice versa")
        return self.model is None

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("NGDIFF_DS_CACHE", "~/.cache/ngdiff_ds")).expanduser()


@dataclass
class Job:
    settings: JobSettings
    raw_config: dict  # the user's DeepSpeed JSON, as read
    layout: BatchLayout
    log: RunLog

    @property
    def ds_config(self) -> dict:
        """The dict handed to ``deepspeed.initialize`` (config.engine_config)."""
        return engine_config(self.raw_config, self.layout)

    def tokenizer_for(self, model: str) -> tuple[str, object, int]:
        """(the model's path or hub id, its tokenizer, the sequence length to use), with the
        errors of a bad model or an over-long --max-length."""
        from ngdiff_ds.engine import load_tokenizer, resolve_model

        model = resolve_model(model)
        return model, load_tokenizer(model), model_max_length(model, self.settings.max_length,
                                                              self.log)


def start_job(settings: JobSettings, output_dir: str | Path, tensorboard: bool = True) -> Job:
    """Read and check the DeepSpeed JSON, join the process group, open the run log."""
    from ngdiff_ds.distributed import init_distributed

    raw_config = read_json(settings.deepspeed)  # before the process group: a typo fails fast
    check_output_dir(output_dir)
    _, world_size = init_distributed(settings.dist_timeout_minutes)
    layout = validate_ds_config(raw_config, settings.deepspeed, world_size,
                                settings.micro_batch_size, settings.grad_accum_steps)
    return Job(settings=settings, raw_config=raw_config, layout=layout,
               log=RunLog(output_dir, tensorboard=tensorboard))


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse an output directory that is a file, lies under a file, or cannot be written;
    nothing is created here (a refused run leaves no directory behind)."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir {output_dir} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output-dir {output_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {output_dir}: {existing} is not writable")


def model_max_length(model: str, requested: int | None, log: RunLog) -> int:
    """``requested`` (None: the default) capped at what the model's positions allow; only an
    explicit request above the limit is warned about."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    if limit is not None and requested > limit:
        log.print(f"warning: --max-length {requested} exceeds the model's max_position_embeddings "
                  f"{limit}; sequences are truncated to {limit} tokens")
        return limit
    return requested
