"""What an unlearning run trains and evaluates on: the split names resolved, the model, the
tokenizer and the two tasks loaded (the embedded default built on first use), and the
training targets' NLL."""

from __future__ import annotations

from dataclasses import dataclass

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.job import Job


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


@dataclass
class Inputs:
    """What the run trains and evaluates on, resolved from the settings."""

    model: str
    data: str
    tokenizer: object
    max_length: int
    forget: object  # TaskData
    retain: object
    default_retain_model: str | None  # the embedded default's retain-only model


def _load_inputs(job: Job, forget_split: str, retain_split: str) -> Inputs:
    from ngdiff_ds.data.task import load_task, shared_examples

    settings, log = job.settings, job.log
    default_retain_model = None
    if settings.uses_embedded_default:
        from ngdiff_ds.default.assets import ensure_default_assets

        defaults = ensure_default_assets(settings.cache_path, first_split(retain_split), log)
        model, data, default_retain_model = (defaults["model_full"], defaults["data"],
                                             defaults["model_retain"])
    else:
        model, data = settings.model, settings.data
    model, tokenizer, max_length = job.tokenizer_for(model)
    forget = load_task("forget", data, forget_split, tokenizer, max_length, job.layout,
                       settings.seed, note=log.print)
    retain = load_task("retain", data, retain_split, tokenizer, max_length, job.layout,
                       settings.seed + 1, note=log.print)
    if shared := shared_examples(forget, retain):
        log.print(f"warning: {shared} of the {len(forget.examples)} forget examples also appear in "
                  f"the retain data ({retain_split}): the two tasks pull them in opposite "
                  "directions")
    return Inputs(model, data, tokenizer, max_length, forget, retain, default_retain_model)


def _target_nlls(built, inputs: Inputs, batch_size: int) -> dict[str, float]:
    from ngdiff_ds.eval.runner import mean_target_nll

    return {name: mean_target_nll(built.engine, task.examples, inputs.tokenizer.pad_token_id,
                                  batch_size)
            for name, task in (("forget_nll", inputs.forget), ("retain_nll", inputs.retain))}
