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

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from ngdiff_ds.adaptive_lr import AdaptiveLRConfig
from ngdiff_ds.checkpoint import CheckpointSettings
from ngdiff_ds.distributed import (is_main_process, leave_distributed, rank0_decides,
                                   rank_and_world_size)
from ngdiff_ds.errors import ConfigError
from ngdiff_ds.eval.selection import best_point, model_utility
from ngdiff_ds.eval.suite import EvalSettings
from ngdiff_ds.job import Job, JobSettings, start_job
from ngdiff_ds.memory import MemorySettings
from ngdiff_ds.run_inputs import (Inputs, _load_inputs, _target_nlls, first_split,
                                  tofu_retain_split)
from ngdiff_ds.starting_model import (attach_reference_model, needs_reference_model,
                                      restore_reference_logprobs, saved_reference_logprobs,
                                      score_reference_logprobs, tasks_needing_logprobs)
from ngdiff_ds.trainer import LoopState
from ngdiff_ds.unlearn_settings import UnlearnSettings

# the run's public names, some defined in the modules split off this one
__all__ = ["UnlearnSettings", "unlearn", "check_checkpoint_space", "tofu_retain_split",
           "first_split"]


def _build(job: Job, inputs: Inputs, rate: AdaptiveLRConfig, memory: MemorySettings | None,
           universal: bool = False):
    from ngdiff_ds.engine import build_engine

    ds_config = job.ds_config
    if universal:  # the checkpoint to load is in DeepSpeed's universal format
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    built = build_engine(inputs.model, ds_config, memory)
    if rate.enabled and built.partitions.flat_grad.dtype != torch.float32:
        # The probes keep theta_old and the step in the gradient buffer: in bf16, noise.
        raise ConfigError(f"{job.settings.deepspeed}: the adaptive learning rate needs fp32 "
                          "gradient accumulation; set data_types.grad_accum_dtype to \"fp32\" "
                          "or pass --no-adaptive-lr")
    return built


def unlearn(job_settings: JobSettings, settings: UnlearnSettings, rate: AdaptiveLRConfig,
            evaluation_settings: EvalSettings, checkpoints: CheckpointSettings | None = None,
            memory: MemorySettings | None = None) -> dict:
    """The unlearning run; every rank calls it. Returns the summary (``summary.json``)."""
    forget_split = settings.forget_split or (
        "forget10+forget10_text" if job_settings.uses_embedded_default else "forget10")
    retain_split = settings.retain_split or tofu_retain_split(forget_split)
    rate = settings.rate_settings(rate)
    job = start_job(job_settings, settings.output_dir)
    try:
        run = _Run(job, settings, rate, evaluation_settings, checkpoints or CheckpointSettings(),
                   forget_split, retain_split, memory)
        summary = run.execute()
        leave_distributed()
        return summary
    finally:
        job.log.close()


class _Run:
    """One unlearning run: started fresh, or resumed from a checkpoint of the same run."""

    def __init__(self, job: Job, settings: UnlearnSettings, rate_config: AdaptiveLRConfig,
                 evaluation_settings: EvalSettings, checkpoints: CheckpointSettings,
                 forget_split: str, retain_split: str, memory: MemorySettings | None = None):
        from ngdiff_ds.checkpoint import Checkpointer
        from ngdiff_ds.eval.run_eval import RunEvaluation
        from ngdiff_ds.lr_probe import AdaptiveRate

        self.job, self.settings, self.log = job, settings, job.log
        self.rate_config, self.evaluation_settings = rate_config, evaluation_settings
        self.forget_split, self.retain_split = forget_split, retain_split
        self.memory = memory
        self.checkpointer = Checkpointer(checkpoints, settings.output_dir, job.log)
        self.resume_from = self.checkpointer.find_resume()
        self.universal = self._prepare_reshape() if self.resume_from is not None else None
        self.inputs = _load_inputs(job, forget_split, retain_split)
        if settings.select_best and not (evaluation_settings.retain_results or
                                         evaluation_settings.retain_model or
                                         self.inputs.default_retain_model):
            raise ConfigError(f"--select-best {settings.select_best} needs forget quality, which "
                              "needs a retain-only reference: pass --retain-model or "
                              "--retain-results")
        self.built = _build(job, self.inputs, rate_config, memory,
                            universal=self.universal is not None)
        check_checkpoint_space(self.built, checkpoints, settings.output_dir)
        self.evaluation = RunEvaluation(
            evaluation_settings, self.inputs.data, first_split(forget_split),
            first_split(retain_split), self.inputs.tokenizer, self.inputs.max_length,
            Path(settings.output_dir) / "eval", job.log) if settings.evaluate else None
        self.method = settings.method()
        self.reference_model = None
        if needs_reference_model(self.method):
            from ngdiff_ds.engine import build_inference_engine

            # the starting model, frozen (on resume too: the model files are the reference)
            self.reference_model = build_inference_engine(self.inputs.model, job.ds_config)
            self.method = attach_reference_model(self.method, self.reference_model.engine)
            job.log.print(f"kept a frozen copy of {self.inputs.model} for the "
                          f"{settings.retain_loss} retaining loss (ZeRO-3, inference only)")
        self.logprob_tasks = tasks_needing_logprobs(self.method, self.inputs.forget,
                                                    self.inputs.retain)
        start_lr = settings.lr if settings.lr is not None else \
            self.built.engine.optimizer.param_groups[0]["lr"]
        self.rate = AdaptiveRate(rate_config, start_lr, self.inputs.forget, self.inputs.retain,
                                 self.method, job.log)
        self.loop = LoopState()
        self.before: dict[str, float] = {}

    def execute(self) -> dict:
        from ngdiff_ds import preemption
        from ngdiff_ds.engine import save_hf_model
        from ngdiff_ds.trainer import run_unlearning

        settings, inputs, built, log = self.settings, self.inputs, self.built, self.log
        log.print(f"NGDiff unlearning: model {inputs.model}, forget {self.forget_split} "
                  f"({len(inputs.forget.examples)} examples), retain {self.retain_split} "
                  f"({len(inputs.retain.examples)}), {rank_and_world_size()[1]} rank(s), global "
                  f"batch {self.job.layout.global_batch_size} per task, {settings.max_steps} "
                  f"steps, method {settings.method_name} (forget loss {settings.forget_loss}, "
                  f"retain loss {settings.retain_loss}, combine {settings.combine})")
        if self.resume_from is None:
            self._start_fresh()
        else:
            self._resume(self.resume_from)
        preemption.install()
        run_unlearning(
            built, inputs.forget, inputs.retain, self.method, self.rate, settings.max_steps, log,
            log_every=settings.log_every, max_consecutive_skips=settings.max_consecutive_skips,
            evaluate=self._evaluate_point if self.evaluation else None,
            eval_every=settings.eval_every, state=self.loop,
            checkpoint=self._checkpoint)

        after = _target_nlls(built, inputs, self.evaluation_settings.batch_size)
        log.record("eval", settings.max_steps, {f"after_{k}": v for k, v in after.items()})
        # Saved before the final evaluation, so a failing evaluation never costs the trained model.
        save_hf_model(built, inputs.tokenizer, Path(settings.output_dir) / "model")
        if self.evaluation:
            self.evaluation.run(built.engine, "final", settings.max_steps)
            self._keep_if_best("final")
            self.evaluation.finish()
        summary = {"model": inputs.model, "data": inputs.data, "forget_split": self.forget_split,
                   "retain_split": self.retain_split, "world_size": rank_and_world_size()[1],
                   "global_batch_per_task": self.job.layout.global_batch_size,
                   "steps": settings.max_steps, "skipped_steps": self.loop.skipped_steps,
                   "method": settings.method_summary(),
                   "adaptive_lr": self.rate.state.to_dict() if self.rate_config.enabled else None,
                   "before": self.before, "after": after, "best_point": self._best_point()}
        _report(settings.output_dir, summary, log)
        return summary

    def _evaluate_point(self, steps_done: int) -> None:
        """The loop's evaluation every --eval-every steps."""
        self.evaluation.run(self.built.engine, f"step{steps_done}", steps_done)
        self._keep_if_best(f"step{steps_done}")

    def _best_point(self) -> dict | None:
        rule = self.settings.select_best
        if rule is None or not self.evaluation:
            return None
        best = best_point(rule, self.evaluation.points)
        if best is None:
            return {"rule": rule, "label": None, "note": "no point has a score under the rule"}
        point, value = best
        return {"rule": rule, "label": point["label"], "score": value,
                "forget_quality": point.get("forget_quality"),
                "model_utility": model_utility(point),
                "model": str(Path(self.settings.output_dir) / "model_best")}

    def _keep_if_best(self, label: str) -> None:
        """--select-best: when the point just evaluated is the best so far, save its model
        as model_best/ (from the live engine: the weights of that point, and of its
        checkpoint). Collective (the save gathers the weights)."""
        from ngdiff_ds.engine import save_hf_model

        best = self._best_point()
        if not rank0_decides(best is not None and best["label"] == label):
            return
        save_hf_model(self.built, self.inputs.tokenizer,
                      Path(self.settings.output_dir) / "model_best")
        self.log.print(f"best point so far by {best['rule']}: {label} (score {best['score']:.4g}, "
                       f"forget quality {best['forget_quality']:.3g}, model utility "
                       f"{best['model_utility']:.3g}); its model saved to {best['model']}")

    def _start_fresh(self) -> None:
        best_dir = Path(self.settings.output_dir) / "model_best"
        if self.settings.select_best and is_main_process() and best_dir.exists():
            shutil.rmtree(best_dir)  # an earlier run's, in this directory: not this run's best
        if self.evaluation:
            self.evaluation.load_reference(self.evaluation_settings, self.job.ds_config,
                                           default_model=self.inputs.default_retain_model)
            if self.settings.evaluate_before:
                self.evaluation.run(self.built.engine, "before", 0)
        self.before = _target_nlls(self.built, self.inputs, self.evaluation_settings.batch_size)
        self.log.record("eval", 0, {f"before_{k}": v for k, v in self.before.items()})
        # before step 0: the engine's weights are the starting model
        score_reference_logprobs(self.built.engine, self.logprob_tasks,
                                 self.evaluation_settings.batch_size, self.log)

    def _identity(self) -> dict:
        """What must not change between a checkpoint and the run that resumes from it."""
        return {"forget_split": self.forget_split, "retain_split": self.retain_split,
                "seed": self.job.settings.seed,
                "global_batch_per_task": self.job.layout.global_batch_size,
                "forget_loss": self.settings.forget_loss, "combine": self.settings.combine,
                "retain_loss": self.settings.retain_loss,
                # what NPO's saved reference log-probs and the method's losses depend on
                "max_length": self.inputs.max_length,
                "method_options": {k: v for k, v in self.settings.method_summary().items()
                                   if k.endswith("_options")},
                # the trainable parameters: a LoRA checkpoint holds adapter state only
                "lora": self.memory.lora_identity() if self.memory else None}

    def _client_state(self) -> dict:
        return {"identity": self._identity(), "loop": dataclasses.asdict(self.loop),
                "adaptive_lr": self.rate.state.to_dict(), "before": self.before,
                "evaluation": self.evaluation.state_dict() if self.evaluation else None,
                "reference_logprobs": saved_reference_logprobs(self.logprob_tasks),
                "log_rows": self.log.rows_written}

    def _checkpoint(self, loop: LoopState, evaluated: bool, stopping: bool) -> None:
        if stopping or self.checkpointer.due(loop.steps_done, self.settings.max_steps, evaluated):
            self.checkpointer.save(self.built, self.inputs.tokenizer, loop.steps_done,
                                   self._client_state())

    def _prepare_reshape(self) -> Path | None:
        """A checkpoint of another number of ranks: keep its global batch (more or fewer
        micro-batches per step) and convert it to DeepSpeed's universal checkpoint."""
        from ngdiff_ds.checkpoint import read_manifest
        from ngdiff_ds.config import layout_for_global_batch

        manifest = read_manifest(self.resume_from)
        world_size = rank_and_world_size()[1]
        if manifest["world_size"] == world_size:
            return None
        global_batch = manifest["identity"]["global_batch_per_task"]
        self.job.layout = layout_for_global_batch(self.job.layout, global_batch)
        self.log.print(f"checkpoint {self.resume_from} was written by {manifest['world_size']} "
                       f"rank(s), this job has {world_size}: global batch {global_batch} kept as "
                       f"{self.job.layout.micro_batches_per_step} micro-batch(es) of "
                       f"{self.job.layout.micro_batch_size} per rank and task")
        return self.checkpointer.to_universal(self.resume_from,
                                              self.job.raw_config["optimizer"]["type"])

    def _resume(self, tag_dir: Path) -> None:
        from ngdiff_ds.adaptive_lr import AdaptiveLRState
        from ngdiff_ds.checkpoint import read_manifest

        # Checked before loading: another run's weights or adapters would fail inside DeepSpeed.
        saved = read_manifest(tag_dir)["identity"]
        # a key the checkpoint lacks was added later (retain_loss: then it was nll; the
        # others were not recorded)
        saved.setdefault("retain_loss", "nll")
        changed = {k: (v, saved[k]) for k, v in self._identity().items()
                   if k in saved and saved[k] != v}
        if changed:
            raise ConfigError(f"checkpoint {tag_dir} belongs to another run: " + ", ".join(
                f"{k} is {new!r} now but was {old!r}" for k, (new, old) in changed.items()))
        state = self.checkpointer.load(self.built, tag_dir, universal=self.universal)
        self.loop = LoopState(**state["loop"])
        self.rate.state = AdaptiveLRState.from_dict(state["adaptive_lr"])
        self.before = state["before"]
        restore_reference_logprobs(self.logprob_tasks, state.get("reference_logprobs"), str(tag_dir))
        if self.evaluation and state["evaluation"] is not None:
            self.evaluation.load_state_dict(state["evaluation"])
        elif self.evaluation:
            self.evaluation.load_reference(self.evaluation_settings, self.job.ds_config,
                                           default_model=self.inputs.default_retain_model)
        self.log.resume(state["log_rows"], purge_step=self.loop.steps_done)
        self.log.print(f"continuing at step {self.loop.steps_done} of {self.settings.max_steps}")


def check_checkpoint_space(built, checkpoints: CheckpointSettings, output_dir: str) -> None:
    """Refuse before the first step when one checkpoint cannot fit on the output disk.

    The estimate: the fp32 master (4 bytes per trainable parameter) and the optimizer state
    (8 for Adam's two moments, 4 for SGD's momentum; 8 assumed), 10 % for the rest.
    """
    if not checkpoints.enabled:
        return
    parameters = sum(p.ds_numel for p in built.model.parameters() if p.requires_grad)
    needed = int(parameters * (4 + 8) * 1.1)
    where = Path(output_dir).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed:
        raise ConfigError(f"--output-dir {output_dir}: one checkpoint of this model needs about "
                          f"{needed / 2**30:.2f} GiB, {where} has {free / 2**30:.2f} GiB free")


def _report(output_dir: str, summary: dict, log) -> None:
    if is_main_process():
        (Path(output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    log.print("NLL of the training targets (mean per example: answer tokens of QA pairs, every "
              "token of passages)   before -> after")
    for name, before in summary["before"].items():
        log.print(f"  {name:12s}  {before:8.4f} -> {summary['after'][name]:8.4f}")
    log.print(f"model saved to {Path(output_dir) / 'model'}")
