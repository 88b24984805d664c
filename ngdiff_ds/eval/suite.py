"""The evaluation a run reports: which sets exist in the data, the retain-only reference, and
one call that scores a model on all of them (TOFU metrics, then MUSE's text metrics).

Shared by ``launch/unlearn.py`` (before, during and after unlearning) and
``launch/evaluate.py`` (a saved model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ngdiff_ds.data.qa import DataError, load_qa_split, load_text_split, load_verbmem_split
from ngdiff_ds.eval import metrics
from ngdiff_ds.eval.muse import evaluate_muse, reference_auc_from_file
from ngdiff_ds.eval.tofu import evaluate_tofu, reference_truth_ratios_from_file


@dataclass
class EvalOptions:
    max_length: int = 256
    batch_size: int = 32
    max_new_tokens: int = 48            # greedy answers to QA pairs (TOFU ROUGE, KnowMem)
    verbmem_max_new_tokens: int = 128   # greedy continuations of forget-text prompts (VerbMem)


@dataclass
class Reference:
    """What the retain-only model contributes: its forget truth ratios (forget quality) and
    its Min-K% AUC (PrivLeak). Either may be missing."""

    forget_truth_ratios: list[float] | None = None
    mia_auc: float | None = None

    @classmethod
    def from_results(cls, results: dict[str, metrics.MetricResult]) -> "Reference":
        ratios = results.get("forget_truth_ratio")
        auc = results.get("mia_min_k")
        return cls(forget_truth_ratios=None if ratios is None else ratios,
                   mia_auc=None if auc is None else auc.agg_value)

    @classmethod
    def from_file(cls, path: str | Path) -> "Reference":
        """A saved results JSON (ours or open-unlearning's) of the retain-only model."""
        try:
            try:
                ratios = reference_truth_ratios_from_file(path)
            except KeyError:
                ratios = None  # e.g. a MUSE-only results file
            reference = cls(forget_truth_ratios=ratios, mia_auc=reference_auc_from_file(path))
        except OSError as error:
            raise ValueError(f"cannot read the reference results {path}: {error.strerror or error}")
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a results JSON in the community schema ({error})")
        if reference.forget_truth_ratios is None and reference.mia_auc is None:
            raise ValueError(f"{path} has neither forget_truth_ratio nor mia_min_k: not a "
                             "retain-only model's results file")
        return reference


@dataclass
class SplitNames:
    forget: str
    retain: str
    wf: str = "world_facts"
    verbmem: str | None = None       # default: <forget>_verbmem
    forget_text: str | None = None   # default: <forget>_text
    holdout_text: str = "holdout_text"
    retain_size: int = 200           # the first N retain QA pairs are scored
    muse: bool = True


# DataError messages that mean "this split is not there" (as opposed to "it is malformed").
_ABSENT = ("not found in directory", "does not exist", "neither a local path nor a loadable dataset")


def load_eval_sets(data: str, names: SplitNames, note=print) -> dict[str, list[dict]]:
    """The evaluation sets the data has. Forget and retain QA are required. The general-fact
    set and the MUSE text sets are optional: one that is absent is skipped (``note`` says so
    and what is lost); one that is present but malformed, or that was named explicitly
    (``verbmem``, ``forget_text``), is an error."""
    sets = {"forget": load_qa_split(data, names.forget),
            "retain": load_qa_split(data, names.retain)[:names.retain_size]}
    optional = [("wf", load_qa_split, names.wf, False, "model utility uses retain only")]
    if names.muse:
        optional += [
            ("verbmem", load_verbmem_split, names.verbmem or f"{names.forget}_verbmem",
             names.verbmem is not None, "no VerbMem"),
            ("forget_text", load_text_split, names.forget_text or f"{names.forget}_text",
             names.forget_text is not None, "no Min-K% AUC / PrivLeak"),
            ("holdout_text", load_text_split, names.holdout_text, False, "no Min-K% AUC / PrivLeak"),
        ]
    single_file = Path(data).is_file()  # every split name resolves to this one (QA) file
    for key, loader, split, explicit, consequence in optional:
        if single_file and key != "wf" and not explicit:
            note(f"note: {data} is a single file, so it has no {split!r} split; {consequence}")
            continue
        try:
            sets[key] = loader(data, split)
        except DataError as error:
            if explicit or not any(marker in str(error) for marker in _ABSENT):
                raise
            note(f"note: no {split!r} split in {data}; {consequence}")
    if ("forget_text" in sets) != ("holdout_text" in sets):
        sets.pop("forget_text", None)
        sets.pop("holdout_text", None)
    return sets


def evaluate_model(engine, tokenizer, sets: dict[str, list[dict]], rank: int, world_size: int,
                   reference: Reference | None, options: EvalOptions) -> dict[str, metrics.MetricResult]:
    """Every metric the sets allow. Collective: every rank calls it, every rank gets the results."""
    reference = reference or Reference()
    tofu_sets = {k: sets[k] for k in ("forget", "retain", "wf") if k in sets}
    results = evaluate_tofu(engine, tokenizer, tofu_sets, rank, world_size,
                            reference_forget_truth_ratios=reference.forget_truth_ratios,
                            max_length=options.max_length, batch_size=options.batch_size,
                            max_new_tokens=options.max_new_tokens)
    muse_sets = {k: sets[k] for k in ("verbmem", "forget_text", "holdout_text") if k in sets}
    if muse_sets:
        results.update(evaluate_muse(engine, tokenizer, muse_sets, rank, world_size,
                                     reference_auc=reference.mia_auc, max_length=options.max_length,
                                     batch_size=options.batch_size,
                                     verbmem_max_new_tokens=options.verbmem_max_new_tokens))
    return results
