"""Plain fine-tuning as a job (launch/finetune.py): QA splits train on their answers, text
splits on every token, all splits together. The loop is ``trainer.run_finetune``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ngdiff_ds.distributed import leave_distributed
from ngdiff_ds.job import JobSettings, start_job
from ngdiff_ds.memory import MemorySettings
from ngdiff_ds.settings import invalid, option


@dataclass
class FinetuneSettings:
    splits: list[str] = option(default_factory=lambda: ["full"],
                               help="splits trained on together: QA splits (answers) and text "
                                    "splits (every token)")
    steps: int = option(None, required=True, help="optimizer steps")
    warmup_steps: int = option(10, help="linear warm-up steps before the cosine decay")
    output_dir: str = option("runs/finetune", help="where the run writes its files")

    def __post_init__(self) -> None:
        if self.steps is None or self.steps < 1:
            invalid(self, "steps", "must be at least 1")
        if self.warmup_steps < 0:
            invalid(self, "warmup_steps", "must be >= 0")


def finetune(job_settings: JobSettings, settings: FinetuneSettings,
             memory: MemorySettings | None = None) -> float:
    """Fine-tune ``job_settings.model`` and save it under ``<output-dir>/model``; every rank
    calls it. Returns the last step's training loss."""
    from ngdiff_ds.data.task import load_task
    from ngdiff_ds.engine import build_engine, save_hf_model
    from ngdiff_ds.trainer import run_finetune

    job_settings.require_model_and_data("launch/finetune.py")
    job = start_job(job_settings, settings.output_dir)
    try:
        model, tokenizer, max_length = job.tokenizer_for(job_settings.model)
        data = load_task("finetune", job_settings.data, "+".join(settings.splits), tokenizer,
                         max_length, job.layout, job_settings.seed, note=job.log.print)
        built = build_engine(model, job.ds_config, memory)
        lr = built.engine.optimizer.param_groups[0]["lr"]
        loss = run_finetune(built, data, settings.steps, lr, job.log,
                            warmup_steps=settings.warmup_steps)
        job.log.print(f"final training loss {loss:.4f}")
        save_hf_model(built, tokenizer, Path(settings.output_dir) / "model")
        leave_distributed()
        return loss
    finally:
        job.log.close()
