"""The evaluation a run reports: which sets exist in the data, the retain-only reference, and
one call that scores a model on all of them (TOFU metrics, then MUSE's text metrics).

Shared by ``launch/unlearn.py`` (before, during and after unlearning) and
``launch/evaluate.py`` (a saved model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ngdiff_ds.data.encoding import encode_text
from ngdiff_ds.data.records import load_qa_split, load_text_split, load_verbmem_split
from ngdiff_ds.errors import ConfigError, DataError, MissingField, SplitNotFound
from ngdiff_ds.eval.muse import evaluate_muse, mia_auc_of
from ngdiff_ds.eval.results import MetricResult, to_results
from ngdiff_ds.eval.tofu import evaluate_tofu, forget_truth_ratios_of
from ngdiff_ds.settings import invalid, option


@dataclass
class EvalSettings:
    """The TOFU and MUSE evaluation flags (shared by launch/unlearn.py and launch/evaluate.py)."""

    batch_size: int = option(32, flag="--eval-batch-size", help="examples per scoring forward")
    wf_split: str = option("world_facts", help="general-fact split for model utility (skipped "
                                               "if the data lacks it)")
    retain_size: int = option(200, flag="--eval-retain-size",
                              help="retain examples scored (the first N of the split)")
    max_new_tokens: int = option(48, help="greedy answer length for TOFU ROUGE and MUSE KnowMem")
    muse: bool = option(True, flag="--no-muse",
                        help="skip the MUSE text metrics (VerbMem, Min-K%% AUC, PrivLeak)")
    verbmem_split: str | None = option(None, help="prompt/gt records for VerbMem (default: "
                                                  "<forget split>_verbmem)")
    forget_text_split: str | None = option(None, help="forget texts for the Min-K%% test "
                                                      "(default: <forget split>_text)")
    holdout_split: str = option("holdout_text", help="texts no model trained on: the "
                                                     "non-members of the Min-K%% test")
    verbmem_max_new_tokens: int = option(128, help="greedy continuation length for VerbMem")
    retain_model: str | None = option(None, help="retain-only model: the forget quality and "
                                                 "PrivLeak reference")
    retain_results: str | None = option(None, help="a saved results JSON of the retain-only "
                                                   "model instead of --retain-model")

    def __post_init__(self) -> None:
        for name in ("batch_size", "retain_size", "max_new_tokens", "verbmem_max_new_tokens"):
            if getattr(self, name) < 1:
                invalid(self, name, "must be at least 1")
        if self.retain_model and self.retain_results:
            raise ConfigError("pass --retain-model or --retain-results, not both: each is the "
                              "reference of forget quality and PrivLeak")

    def split_names(self, forget: str, retain: str) -> "SplitNames":
        return SplitNames(forget=forget, retain=retain, wf=self.wf_split,
                          verbmem=self.verbmem_split, forget_text=self.forget_text_split,
                          holdout_text=self.holdout_split, retain_size=self.retain_size,
                          muse=self.muse)

    def options(self, max_length: int) -> "EvalOptions":
        return EvalOptions(max_length=max_length, batch_size=self.batch_size,
                           max_new_tokens=self.max_new_tokens,
                           verbmem_max_new_tokens=self.verbmem_max_new_tokens)


@dataclass
class EvalOptions:
    max_length: int = 256
    batch_size: int = 32
    max_new_tokens: int = 48            # greedy answers to QA pairs (TOFU ROUGE, KnowMem)
    verbmem_max_new_tokens: int = 128   # greedy continuations of forget-text prompts (VerbMem)


@dataclass
class Reference:
    """What the retain-only model contributes: its per-example forget truth ratios (for
    forget quality) and its Min-K% AUC (for PrivLeak). Either may be missing."""

    forget_truth_ratios: list[float] | None = None
    mia_auc: float | None = None

    @classmethod
    def from_results(cls, results: dict[str, MetricResult]) -> "Reference":
        """From the freshly computed results of the retain-only model."""
        return cls.from_mapping(to_results(results), "the retain-only model's results")

    @classmethod
    def from_file(cls, path: str | Path) -> "Reference":
        """From a saved ``*_results.json`` (ours or open-unlearning's) of the retain-only model."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as error:
            raise DataError(f"cannot read the reference results {path}: "
                            f"{error.strerror or error}") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from None
        reference = cls.from_mapping(data, str(path))
        if reference.forget_truth_ratios is None and reference.mia_auc is None:
            raise DataError(f"{path} has neither forget_truth_ratio nor mia_min_k: not a "
                             "retain-only model's results file")
        return reference

    @classmethod
    def from_mapping(cls, data, source: str) -> "Reference":
        if not isinstance(data, dict):
            raise DataError(f"{source}: expected a JSON object of metric results")
        try:
            return cls(forget_truth_ratios=forget_truth_ratios_of(data), mia_auc=mia_auc_of(data))
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{source} is not in the results schema (metric -> agg_value, "
                            f"value_by_index): {type(error).__name__} {error}") from None


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


def load_eval_sets(data: str, names: SplitNames, note=print) -> dict[str, list[dict]]:
    """The evaluation sets the data has.

    TOFU needs the forget and retain splits to be QA splits; a forget split of text records
    (a MUSE-style run) skips TOFU with a note and serves as the Min-K% member set. The
    general-fact set and the MUSE sets are optional: one that is absent is skipped (``note``
    says so and what is lost); one that is present but malformed, or that was named
    explicitly (``verbmem``, ``forget_text``), is an error.
    """
    sets = {}
    try:
        sets["forget"] = load_qa_split(data, names.forget)
    except MissingField as error:
        if error.field != "question":
            raise
        # Not QA: then it must be text (else this raises), and it is the Min-K% member set
        # unless another one is named.
        forget_texts = load_text_split(data, names.forget)
        note(f"note: {names.forget!r} holds text, not QA pairs; no TOFU metrics")
        if names.muse and names.forget_text is None:
            sets["forget_text"] = forget_texts
    if "forget" in sets:
        sets["retain"] = load_qa_split(data, names.retain)[:names.retain_size]
    if Path(data).is_file():
        note(f"note: {data} is a single file, so it has no general-fact or MUSE text splits")
        return sets
    optional = [("wf", load_qa_split, names.wf, False, "model utility uses retain only")]
    if names.muse:
        optional += [
            ("verbmem", load_verbmem_split, names.verbmem or f"{names.forget}_verbmem",
             names.verbmem is not None, "no VerbMem"),
            ("forget_text", load_text_split, names.forget_text or f"{names.forget}_text",
             names.forget_text is not None, "no Min-K% AUC / PrivLeak"),
            ("holdout_text", load_text_split, names.holdout_text, False, "no Min-K% AUC / PrivLeak"),
        ]
    # wf only goes with the TOFU sets; a forget text set already found is not looked up again
    optional = [entry for entry in optional if entry[0] not in sets
                and (entry[0] != "wf" or "forget" in sets)]
    for key, loader, split, explicit, consequence in optional:
        try:
            sets[key] = loader(data, split)
        except SplitNotFound:
            if explicit:
                raise
            note(f"note: no {split!r} split in {data}; {consequence}")
    if ("forget_text" in sets) != ("holdout_text" in sets):
        sets.pop("forget_text", None)
        sets.pop("holdout_text", None)
    return sets


def truncated_texts_note(tokenizer, sets: dict[str, list[dict]], max_length: int) -> str | None:
    """A note when Min-K% texts are longer than ``max_length`` tokens and only their start is
    scored (MUSE scores whole chunks: raise --max-length, or chunk the texts)."""
    texts = [r["text"] for key in ("forget_text", "holdout_text") for r in sets.get(key, [])]
    cut = sum(encode_text(tokenizer, text, max_length)["truncated"] for text in texts)
    if not cut:
        return None
    return (f"note: {cut} of {len(texts)} Min-K% texts are longer than --max-length {max_length} "
            "tokens; only their first tokens are scored")


def evaluate_model(engine, tokenizer, sets: dict[str, list[dict]], reference: Reference | None,
                   options: EvalOptions) -> dict[str, MetricResult]:
    """Every metric the sets allow. Collective: every rank calls it, every rank gets the results."""
    reference = reference or Reference()
    tofu_sets = {k: sets[k] for k in ("forget", "retain", "wf") if k in sets}
    results = {}
    if tofu_sets:
        results.update(evaluate_tofu(engine, tokenizer, tofu_sets,
                                     reference_forget_truth_ratios=reference.forget_truth_ratios,
                                     max_length=options.max_length, batch_size=options.batch_size,
                                     max_new_tokens=options.max_new_tokens))
    muse_sets = {k: sets[k] for k in ("verbmem", "forget_text", "holdout_text") if k in sets}
    if muse_sets:
        results.update(evaluate_muse(engine, tokenizer, muse_sets,
                                     reference_auc=reference.mia_auc, max_length=options.max_length,
                                     batch_size=options.batch_size,
                                     verbmem_max_new_tokens=options.verbmem_max_new_tokens))
    return results
