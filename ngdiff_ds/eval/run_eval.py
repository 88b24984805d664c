"""The evaluation of a run: the retain-only reference once, then each evaluation point; the
results files, TensorBoard scalars, the table and the trade-off plot.

Shared by ``launch/unlearn.py`` (before, every ``--eval-every`` steps, and after unlearning)
and ``launch/evaluate.py`` (a saved model). Every method is collective: all ranks call it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ngdiff_ds.distributed import is_main_process, leave_distributed
from ngdiff_ds.engine import build_inference_engine, resolve_model
from ngdiff_ds.eval.report import format_table, plot_trajectory, write_results
from ngdiff_ds.eval.results import summary as summarise
from ngdiff_ds.eval.results import to_results
from ngdiff_ds.eval.suite import (EvalSettings, Reference, evaluate_model, load_eval_sets,
                                  truncated_texts_note)
from ngdiff_ds.job import JobSettings, start_job
from ngdiff_ds.run_log import RunLog
from ngdiff_ds.settings import option

HEADLINE_METRICS = ("forget_quality", "model_utility", "model_utility_partial", "forget_Q_A_ROUGE",
                    "forget_verbmem_ROUGE", "tofu_privleak", "privleak")


class RunEvaluation:
    """Scores models on the evaluation sets of ``data`` and keeps one column per point."""

    def __init__(self, settings: EvalSettings, data: str, forget_split: str, retain_split: str,
                 tokenizer, max_length: int, out_dir: str | Path, log: RunLog):
        self.tokenizer, self.log = tokenizer, log
        self.out_dir = Path(out_dir)
        self.options = settings.options(max_length)
        self.sets = load_eval_sets(data, settings.split_names(forget_split, retain_split),
                                   note=log.print)
        if note := truncated_texts_note(tokenizer, self.sets, max_length):
            log.print(note)
        self.points, self.columns = [], {}
        self.reference = None
        self._notes_said = set()

    def _note_once(self, line: str) -> None:
        """Each evaluation point would repeat the same notes: say each once."""
        if line not in self._notes_said:
            self._notes_said.add(line)
            self.log.print(line)

    def load_reference(self, settings: EvalSettings, ds_config: dict,
                       default_model: str | None = None) -> None:
        """The reference of forget quality and PrivLeak: the ``--retain-results`` file, else
        the scores of ``--retain-model`` (or ``default_model``), else none."""
        if settings.retain_results:
            self.reference = Reference.from_file(settings.retain_results, note=self.log.print)
        elif settings.retain_model or default_model:
            self.evaluate_reference(settings.retain_model or default_model, ds_config)

    def evaluate_reference(self, model: str, ds_config: dict) -> None:
        """Score the retain-only ``model`` (an inference-only engine, freed afterwards); its
        forget truth ratios and Min-K% AUC become the reference of every later point."""
        reference = build_inference_engine(resolve_model(model), ds_config)
        started = time.perf_counter()
        results = evaluate_model(reference.engine, self.tokenizer, self.sets, None, self.options,
                                 note=self._note_once)
        self.reference = Reference.from_results(results)
        self._record("retain_model", results, None)
        self.log.print(f"metrics @ retain_model ({time.perf_counter() - started:.1f} s)")
        del reference

    def run(self, engine, tag: str, step: int | None) -> dict[str, float]:
        """Score ``engine`` (a DeepSpeed engine) as evaluation point ``tag``; returns its
        summary. ``step`` None: not a point of the run's trajectory (a saved model)."""
        started = time.perf_counter()
        summary = self._record(tag, evaluate_model(engine, self.tokenizer, self.sets,
                                                   self.reference, self.options,
                                                   note=self._note_once), step)
        seconds = time.perf_counter() - started
        self.log.print(f"metrics @ {tag} ({seconds:.1f} s): " + ", ".join(
            f"{k} {summary[k]:.4g}" for k in HEADLINE_METRICS if k in summary))
        return summary

    def _record(self, tag, results, step) -> dict[str, float]:
        if is_main_process():
            summary = write_results(results, self.out_dir, tag, self.options.settings_record())
        else:
            summary = summarise(to_results(results))
        self.columns[tag] = summary
        if step is not None:
            self.log.record("unlearning_metrics", step, summary)
            self.points.append({"label": tag, **summary})
        return summary

    def state_dict(self) -> dict:
        """What a checkpoint carries: the columns and points so far, and the reference."""
        reference = None if self.reference is None else asdict(self.reference)
        return {"columns": self.columns, "points": self.points, "reference": reference}

    def load_state_dict(self, state: dict) -> None:
        self.columns, self.points = dict(state["columns"]), list(state["points"])
        reference = state["reference"]
        self.reference = None if reference is None else Reference(**reference)

    def finish(self) -> None:
        """Print the table of every column; rank 0 plots the trajectory."""
        self.log.print("\nTOFU and MUSE metrics (one column per model or evaluation point):\n"
                       + format_table(self.columns))
        if is_main_process() and self.points:
            plot_trajectory(self.points, self.out_dir / "forget_quality_vs_utility.png")


@dataclass
class EvaluateSettings:
    """The flags of launch/evaluate.py besides the job's and the evaluation's."""

    forget_split: str = option("forget10", help="forget QA split (TOFU); MUSE's defaults follow "
                                                "its name")
    retain_split: str = option("retain90", help="retain QA split")
    output_dir: str = option("runs/eval", help="where the results files are written")


def evaluate_saved_model(job_settings: JobSettings, settings: EvaluateSettings,
                         evaluation_settings: EvalSettings) -> dict[str, float]:
    """TOFU and MUSE metrics of ``job_settings.model`` (with the retain-only model's column
    when ``--retain-model`` is given); every rank calls it. Returns the model's summary."""
    job_settings.require_model_and_data("launch/evaluate.py")
    job = start_job(job_settings, settings.output_dir, tensorboard=False)
    try:
        model, tokenizer, max_length = job.tokenizer_for(job_settings.model)
        evaluation = RunEvaluation(evaluation_settings, job_settings.data, settings.forget_split,
                                   settings.retain_split, tokenizer, max_length,
                                   settings.output_dir, job.log)
        evaluation.load_reference(evaluation_settings, job.ds_config)
        built = build_inference_engine(model, job.ds_config)
        summary = evaluation.run(built.engine, "model", None)
        evaluation.finish()
        job.log.print(f"results written to {settings.output_dir}")
        leave_distributed()
        return summary
    finally:
        job.log.close()
