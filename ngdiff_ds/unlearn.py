"""The whole unlearning run, callable without the command line::

    from ngdiff_ds.adaptive_lr import AdaptiveLRConfig
    from ngdiff_ds.eval.suite import EvalSettings
    from ngdiff_ds.job import JobSettings
    from ngdiff_ds.unlearn import UnlearnSettings, unlearn

    summary = unlearn(JobSettings(deepspeed="ds_configs/zero3.json"),
                      UnlearnSettings(max_steps=40), AdaptiveLRConfig(total_steps=40),
                      EvalSettings())

(inside a process group the launcher set up, e.g. under ``deepspeed``). Load the model and
the two tasks, build the ZeRO-3 engine, evaluate, run the loop (trainer.py), save the model,
evaluate again, write the summary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ngdiff_ds.adaptive_lr import AdaptiveLRConfig
from ngdiff_ds.combine import COMBINE_RULES
from ngdiff_ds.distributed import is_main_process, rank_and_world_size
from ngdiff_ds.errors import ConfigError
from ngdiff_ds.eval.suite import EvalSettings
from ngdiff_ds.job import Job, JobSettings, start_job
from ngdiff_ds.losses import FORGET_LOSSES, RETAIN_LOSSES
from ngdiff_ds.registry import load_plugin, parse_option_strings
from ngdiff_ds.settings import invalid, option
from ngdiff_ds.trainer import Method


@dataclass
class UnlearnSettings:
    """The flags of an unlearning run that are not DeepSpeed's, the job's or the rate's."""

    forget_split: str | None = option(
        None, help="split(s) to unlearn; several joined by '+' are concatenated, QA and text "
                   "splits alike (default: forget10, and on the embedded default "
                   "forget10+forget10_text: the QA pairs and the passages)")
    retain_split: str | None = option(
        None, help="default: the TOFU complement of each --forget-split part (forget10 -> "
                   "retain90, forget10_text -> retain90_text)")
    output_dir: str = option("runs/ngdiff", help="where the run writes its files")
    max_steps: int = option(40, help="optimizer steps")
    lr: float | None = option(None, help="default: optimizer.params.lr of the JSON")
    combine: str = option("ngdiff", help=f"combine rule: {', '.join(COMBINE_RULES.names())}")
    forget_loss: str = option("ga", help="forgetting loss: " + ", ".join(FORGET_LOSSES.names()))
    retain_loss: str = option("nll", help="retaining loss: " + ", ".join(RETAIN_LOSSES.names()))
    combine_options: list[str] = option(default_factory=list, flag="--combine-option",
                                        action="append", metavar="KEY=VALUE",
                                        help="an option of the combine rule (repeatable), e.g. "
                                             "retain_weight=0.5 for gdiff")
    forget_loss_options: list[str] = option(default_factory=list, flag="--forget-loss-option",
                                            action="append", metavar="KEY=VALUE",
                                            help="an option of the forgetting loss (repeatable)")
    retain_loss_options: list[str] = option(default_factory=list, flag="--retain-loss-option",
                                            action="append", metavar="KEY=VALUE",
                                            help="an option of the retaining loss (repeatable)")
    plugins: list[str] = option(default_factory=list, flag="--plugin", action="append",
                                metavar="MODULE_OR_FILE",
                                help="import a module (or .py file) that registers losses or "
                                     "combine rules, before the names above are looked up")
    log_every: int = option(1, help="print a step line every this many steps")
    eval_every: int = option(0, help="evaluate before, every this many steps, and after "
                                     "(0: only before and after)")
    evaluate: bool = option(True, flag="--no-eval", help="skip all metrics (the "
                                                         "training-target NLL is still reported)")
    max_consecutive_skips: int = 10  # abort instead of burning GPU hours on a NaN model

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_every"):
            if getattr(self, name) < 1:
                invalid(self, name, "must be at least 1")
        if self.eval_every < 0:
            invalid(self, "eval_every", "must be >= 0")
        if self.lr is not None and not self.lr > 0:
            invalid(self, "lr", "must be positive")
        for plugin in self.plugins:
            load_plugin(plugin)
        self.method()  # unknown names and options fail now, not after the model is loaded

    def method(self) -> Method:
        """The forgetting loss, retaining loss and combine rule, each bound to its options."""
        bound = {}
        for key, registry, name, pairs, flag in (
                ("forget_loss", FORGET_LOSSES, self.forget_loss, self.forget_loss_options,
                 "--forget-loss-option"),
                ("retain_loss", RETAIN_LOSSES, self.retain_loss, self.retain_loss_options,
                 "--retain-loss-option"),
                ("combine_rule", COMBINE_RULES, self.combine, self.combine_options,
                 "--combine-option")):
            bound[key] = registry.bind(name, parse_option_strings(registry, name, pairs, flag))
        return Method(**bound)


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
    from ngdiff_ds.data.task import load_task

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
    return Inputs(model, data, tokenizer, max_length, forget, retain, default_retain_model)


def _start_evaluation(job: Job, settings: EvalSettings, inputs: Inputs, forget_split: str,
                      retain_split: str, output_dir: str):
    """The run's evaluation, with its reference: a results file, --retain-model, or the
    embedded default's retain-only model."""
    from ngdiff_ds.eval.run_eval import RunEvaluation

    # The QA part (the first split) is what TOFU scores; MUSE's defaults follow its name.
    evaluation = RunEvaluation(settings, inputs.data, first_split(forget_split),
                               first_split(retain_split), inputs.tokenizer, inputs.max_length,
                               Path(output_dir) / "eval", job.log)
    evaluation.load_reference(settings, job.ds_config, default_model=inputs.default_retain_model)
    return evaluation


def _target_nlls(built, inputs: Inputs, batch_size: int) -> dict[str, float]:
    from ngdiff_ds.eval.runner import mean_target_nll

    return {name: mean_target_nll(built.engine, task.examples, inputs.tokenizer.pad_token_id,
                                  batch_size)
            for name, task in (("forget_nll", inputs.forget), ("retain_nll", inputs.retain))}


def _build(job: Job, inputs: Inputs, rate: AdaptiveLRConfig):
    from ngdiff_ds.engine import build_engine

    built = build_engine(inputs.model, job.ds_config)
    if rate.enabled and built.partitions.flat_grad.dtype != torch.float32:
        # The probes keep theta_old and the step in the gradient buffer: in bf16, noise.
        raise ConfigError(f"{job.settings.deepspeed}: the adaptive learning rate needs fp32 "
                          "gradient accumulation; set data_types.grad_accum_dtype to \"fp32\" "
                          "or pass --no-adaptive-lr")
    return built


def unlearn(job_settings: JobSettings, settings: UnlearnSettings, rate: AdaptiveLRConfig,
            evaluation_settings: EvalSettings) -> dict:
    """The unlearning run; every rank calls it. Returns the summary (``summary.json``)."""
    forget_split = settings.forget_split or (
        "forget10+forget10_text" if job_settings.uses_embedded_default else "forget10")
    retain_split = settings.retain_split or tofu_retain_split(forget_split)
    job = start_job(job_settings, settings.output_dir)
    try:
        return _run(job, settings, rate, evaluation_settings, forget_split, retain_split)
    finally:
        job.log.close()


def _run(job: Job, settings: UnlearnSettings, rate_config: AdaptiveLRConfig,
         evaluation_settings: EvalSettings, forget_split: str, retain_split: str) -> dict:
    from ngdiff_ds.engine import save_hf_model
    from ngdiff_ds.lr_probe import AdaptiveRate
    from ngdiff_ds.trainer import run_unlearning

    log = job.log
    inputs = _load_inputs(job, forget_split, retain_split)
    built = _build(job, inputs, rate_config)
    log.print(f"NGDiff unlearning: model {inputs.model}, forget {forget_split} "
              f"({len(inputs.forget.examples)} examples), retain {retain_split} "
              f"({len(inputs.retain.examples)}), {rank_and_world_size()[1]} rank(s), global batch "
              f"{job.layout.global_batch_size} per task, {settings.max_steps} steps, combine "
              f"{settings.combine}, forget loss {settings.forget_loss}")
    evaluation = _start_evaluation(job, evaluation_settings, inputs, forget_split, retain_split,
                                   settings.output_dir) if settings.evaluate else None
    if evaluation:
        evaluation.run(built.engine, "before", 0)
    before = _target_nlls(built, inputs, evaluation_settings.batch_size)
    log.record("eval", 0, {f"before_{k}": v for k, v in before.items()})

    method = settings.method()
    start_lr = settings.lr if settings.lr is not None else built.engine.optimizer.param_groups[0]["lr"]
    rate = AdaptiveRate(rate_config, start_lr, inputs.forget, inputs.retain, method, log)
    history = run_unlearning(
        built, inputs.forget, inputs.retain, method, rate, settings.max_steps, log,
        log_every=settings.log_every, max_consecutive_skips=settings.max_consecutive_skips,
        evaluate=(lambda step: evaluation.run(built.engine, f"step{step}", step))
        if evaluation else None, eval_every=settings.eval_every)

    after = _target_nlls(built, inputs, evaluation_settings.batch_size)
    log.record("eval", settings.max_steps, {f"after_{k}": v for k, v in after.items()})
    # Saved before the final evaluation, so a failing evaluation never costs the trained model.
    save_hf_model(built, inputs.tokenizer, Path(settings.output_dir) / "model")
    if evaluation:
        evaluation.run(built.engine, "final", settings.max_steps)
        evaluation.finish()
    summary = {"model": inputs.model, "data": inputs.data, "forget_split": forget_split,
               "retain_split": retain_split, "world_size": rank_and_world_size()[1],
               "global_batch_per_task": job.layout.global_batch_size, "steps": settings.max_steps,
               "skipped_steps": sum(s.skipped for s in history),
               "adaptive_lr": rate.state.to_dict() if rate_config.enabled else None,
               "before": before, "after": after}
    _report(settings.output_dir, summary, log)
    return summary


def _report(output_dir: str, summary: dict, log) -> None:
    if is_main_process():
        (Path(output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    log.print("NLL of the training targets (mean per example: answer tokens of QA pairs, every "
              "token of passages)   before -> after")
    for name, before in summary["before"].items():
        log.print(f"  {name:12s}  {before:8.4f} -> {summary['after'][name]:8.4f}")
    log.print(f"model saved to {Path(output_dir) / 'model'}")
