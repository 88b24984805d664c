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
from ngdiff_ds.eval.membership import mia_auc_of, per_example_nll_of
from ngdiff_ds.eval.muse import evaluate_muse
from ngdiff_ds.eval.results import MetricResult, to_results
from ngdiff_ds.eval.tofu import evaluate_tofu, forget_truth_ratios_of
from ngdiff_ds.settings import invalid, option


@dataclass
class EvalSettings:
    """The TOFU and MUSE evaluation flags (shared by launch/unlearn.py and launch/evaluate.py)."""

    batch_size: int = option(32, flag="--eval-batch-size", help="examples per scoring forward")
    wf_split: str = option("world_facts", help="general-fact split for model utility (skipped "
                                               "if the data lacks it)")
    ra_split: str = option("real_authors", help="real-authors split for model utility (TOFU's "
                                                "real_authors_perturbed; skipped if absent)")
    retain_eval_split: str = option("retain_perturbed",
                                    help="retain QA scored for model utility, as TOFU's "
                                         "retain_perturbed (if the data lacks it: the first "
                                         "--eval-retain-size pairs of the retain split)")
    retain_size: int = option(200, flag="--eval-retain-size",
                              help="retain examples scored without a --retain-eval-split "
                                   "(the first N of the retain split)")
    tofu_holdout_split: str = option("holdout", help="QA pairs of authors no model trained on: "
                                                     "the non-members of the QA-side membership "
                                                     "attacks (TOFU's holdout; skipped if absent)")
    max_new_tokens: int = option(200, help="greedy answer budget for TOFU ROUGE (TOFU and "
                                           "open-unlearning: 200; generation stops at eos)")
    muse: bool = option(True, flag="--no-muse",
                        help="skip the MUSE text metrics (VerbMem, KnowMem, membership attacks, "
                             "PrivLeak)")
    verbmem_split: str | None = option(None, help="prompt/gt records for VerbMem (default: "
                                                  "<forget split>_verbmem)")
    forget_text_split: str | None = option(None, help="forget texts for the Min-K%% test "
                                                      "(default: <forget split>_text)")
    holdout_split: str = option("holdout_text", help="texts no model trained on: the "
                                                     "non-members of the Min-K%% test")
    verbmem_max_new_tokens: int = option(128, help="greedy continuation length for VerbMem")
    knowmem_split: str | None = option(None, help="MUSE KnowMem QA of the forget set (default: "
                                                  "<forget split>_knowmem; skipped if absent)")
    knowmem_retain_split: str | None = option(None, help="MUSE KnowMem QA of the retain set "
                                                         "(default: <retain split>_knowmem)")
    knowmem_icl_split: str = option("knowmem_icl", help="few-shot QA pairs of MUSE's KnowMem "
                                                        "prompt (absent: zero-shot)")
    knowmem_max_new_tokens: int = option(32, help="greedy answer length for MUSE KnowMem")
    rouge_stemming: str = option("muse", choices=("muse", "open-unlearning"),
                                 help="stemming of VerbMem / KnowMem ROUGE: MUSE's code does "
                                      "not stem (muse), open-unlearning stems "
                                      "(open-unlearning); the results record which")
    retain_model: str | None = option(None, help="retain-only model: the forget quality and "
                                                 "PrivLeak reference")
    retain_results: str | None = option(None, help="the retain-only model's saved results "
                                                   "instead of --retain-model: our "
                                                   "<tag>_results.json, or open-unlearning's "
                                                   "TOFU_EVAL.json / MUSE_EVAL.json (or a "
                                                   "directory holding them)")

    def __post_init__(self) -> None:
        for name in ("batch_size", "retain_size", "max_new_tokens", "verbmem_max_new_tokens",
                     "knowmem_max_new_tokens"):
            if getattr(self, name) < 1:
                invalid(self, name, "must be at least 1")
        if self.rouge_stemming not in ("muse", "open-unlearning"):
            invalid(self, "rouge_stemming", "must be muse or open-unlearning")
        if self.retain_model and self.retain_results:
            raise ConfigError("pass --retain-model or --retain-results, not both: each is the "
                              "reference of forget quality and PrivLeak")

    def split_names(self, forget: str, retain: str) -> "SplitNames":
        return SplitNames(forget=forget, retain=retain, wf=self.wf_split, ra=self.ra_split,
                          retain_eval=self.retain_eval_split, holdout=self.tofu_holdout_split,
                          verbmem=self.verbmem_split, forget_text=self.forget_text_split,
                          knowmem=self.knowmem_split, knowmem_retain=self.knowmem_retain_split,
                          knowmem_icl=self.knowmem_icl_split,
                          holdout_text=self.holdout_split, retain_size=self.retain_size,
                          muse=self.muse)

    def options(self, max_length: int) -> "EvalOptions":
        return EvalOptions(max_length=max_length, batch_size=self.batch_size,
                           max_new_tokens=self.max_new_tokens,
                           verbmem_max_new_tokens=self.verbmem_max_new_tokens,
                           knowmem_max_new_tokens=self.knowmem_max_new_tokens,
                           use_stemmer=self.rouge_stemming == "open-unlearning")


@dataclass
class EvalOptions:
    max_length: int = 256
    batch_size: int = 32
    max_new_tokens: int = 200           # greedy answers to QA pairs (TOFU ROUGE)
    verbmem_max_new_tokens: int = 128   # greedy continuations of forget-text prompts (VerbMem)
    knowmem_max_new_tokens: int = 32    # greedy answers of MUSE's KnowMem
    use_stemmer: bool = False           # VerbMem / KnowMem ROUGE (MUSE: off)

    def settings_record(self) -> dict:
        """What the results files record about how they were computed."""
        return {"tofu_max_new_tokens": self.max_new_tokens,
                "verbmem_max_new_tokens": self.verbmem_max_new_tokens,
                "knowmem_max_new_tokens": self.knowmem_max_new_tokens,
                "rouge_stemming": "open-unlearning" if self.use_stemmer else "muse"}


@dataclass
class Reference:
    """What the retain-only model contributes: its per-example forget truth ratios (forget
    quality), the AUCs of its Min-K% attack (PrivLeak) on texts (MUSE: forget vs held-out
    passages) and on QA pairs (TOFU: forget vs held-out authors' QA), and its per-example
    NLLs on those sets (``mia_reference``). Any of them may be missing."""

    forget_truth_ratios: list[float] | None = None
    mia_auc: float | None = None        # text-based (MUSE) Min-K% AUC
    tofu_mia_auc: float | None = None   # QA-based (TOFU) Min-K% AUC
    text_nll: dict | None = None        # {"forget": [...], "holdout": [...]}, per text
    tofu_nll: dict | None = None        # the same per QA pair

    def is_empty(self) -> bool:
        return all(value is None for value in vars(self).values())

    @classmethod
    def from_results(cls, results: dict[str, MetricResult]) -> "Reference":
        """From the freshly computed results of the retain-only model."""
        return cls.from_mapping(to_results(results), "the retain-only model's results")

    @classmethod
    def from_file(cls, path: str | Path, note=print) -> "Reference":
        """From the retain-only model's saved results: our ``<tag>_results.json``, one of
        open-unlearning's ``TOFU_EVAL.json`` / ``MUSE_EVAL.json``, or a directory of those two."""
        path = Path(path)
        if path.is_dir():
            files = [path / name for name in ("TOFU_EVAL.json", "MUSE_EVAL.json")
                     if (path / name).is_file()]
            if not files:
                raise DataError(f"{path} holds neither TOFU_EVAL.json nor MUSE_EVAL.json")
        else:
            files = [path]
        reference = cls()
        for file in files:
            part = cls.from_mapping(_read_json(file), str(file), note=note)
            for name, value in vars(part).items():
                if value is not None:
                    setattr(reference, name, value)
        if reference.is_empty():
            raise DataError(f"{path} has neither forget_truth_ratio nor mia_min_k: not a "
                            "retain-only model's results file")
        return reference

    @classmethod
    def from_mapping(cls, data, source: str, note=print) -> "Reference":
        if not isinstance(data, dict):
            raise DataError(f"{source}: expected a JSON object of metric results")
        try:
            reference = cls(forget_truth_ratios=forget_truth_ratios_of(data))
            if any(key.startswith("tofu_mia_") for key in data):
                # Our own merged file: both families, each under its own name.
                reference.mia_auc, reference.text_nll = _attack_reference(data, "")
                reference.tofu_mia_auc, reference.tofu_nll = _attack_reference(data, "tofu_")
            elif "mia_min_k" in data:
                pair = _attack_pair(data, source)
                auc, nll = _attack_reference(data, "")
                if pair == "qa":
                    reference.tofu_mia_auc, reference.tofu_nll = auc, nll
                    note(f"note: the mia_min_k of {source} compares forget and held-out QA "
                         "pairs (TOFU): it is the reference of tofu_privleak only, not of "
                         "MUSE's text-based privleak")
                else:
                    reference.mia_auc, reference.text_nll = auc, nll
            return reference
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DataError(f"{source} is not in the results schema (metric -> agg_value, "
                            f"value_by_index): {type(error).__name__} {error}") from None


_TOFU_KEYS = ("forget_truth_ratio", "forget_Q_A_Prob", "forget_quality")
_MUSE_KEYS = ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "forget_text_min_k")


def _attack_pair(data: dict, source: str) -> str:
    """Which pair of sets a results file's ``mia_min_k`` compares: ``"qa"`` (TOFU: forget vs
    held-out QA pairs, as open-unlearning's TOFU_EVAL.json) or ``"text"`` (MUSE)."""
    name = Path(source).name
    if name.startswith("TOFU_"):
        return "qa"
    if name.startswith("MUSE_"):
        return "text"
    has_tofu = any(key in data for key in _TOFU_KEYS)
    has_muse = any(key in data for key in _MUSE_KEYS)
    if has_muse:
        return "text"  # MUSE's file, or this package's merged file (text-based mia_min_k)
    if has_tofu:
        return "qa"
    raise DataError(f"{source}: cannot tell whether its mia_min_k compares forget and held-out "
                    "QA pairs (TOFU) or texts (MUSE); name the file TOFU_EVAL.json or "
                    "MUSE_EVAL.json as open-unlearning does")


def _attack_reference(data: dict, prefix: str) -> tuple[float | None, dict | None]:
    """The Min-K% AUC and the per-example NLLs (from ``mia_loss``) of one attack family."""
    auc = mia_auc_of(data, f"{prefix}mia_min_k")
    loss = data.get(f"{prefix}mia_loss")
    nll = None
    if isinstance(loss, dict) and "forget" in loss and "holdout" in loss:
        nll = {part: per_example_nll_of(loss[part]) for part in ("forget", "holdout")}
    return auc, nll


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise DataError(f"cannot read the reference results {path}: "
                        f"{error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None


@dataclass
class SplitNames:
    forget: str
    retain: str
    wf: str = "world_facts"
    ra: str = "real_authors"
    retain_eval: str = "retain_perturbed"  # scored instead of the first retain_size retain pairs
    holdout: str = "holdout"         # held-out authors' QA: QA-side membership non-members
    verbmem: str | None = None       # default: <forget>_verbmem
    knowmem: str | None = None       # default: <forget>_knowmem
    knowmem_retain: str | None = None  # default: <retain>_knowmem
    knowmem_icl: str = "knowmem_icl"
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
        sets["retain"] = _retain_eval_set(data, names, note)
    if Path(data).is_file():
        note(f"note: {data} is a single file, so it has no general-fact or MUSE text splits")
        return sets
    optional = [("ra", load_qa_split, names.ra, False, "no real-authors part of model utility"),
                ("wf", load_qa_split, names.wf, False, "no world-facts part of model utility"),
                ("holdout", load_qa_split, names.holdout, False,
                 "no QA-side membership attacks (tofu_mia_*, tofu_privleak)")]
    if names.muse:
        optional += [
            ("verbmem", load_verbmem_split, names.verbmem or f"{names.forget}_verbmem",
             names.verbmem is not None, "no VerbMem"),
            ("forget_knowmem", load_qa_split, names.knowmem or f"{names.forget}_knowmem",
             names.knowmem is not None, "no MUSE KnowMem of the forget set"),
            ("retain_knowmem", load_qa_split, names.knowmem_retain or f"{names.retain}_knowmem",
             names.knowmem_retain is not None, "no MUSE KnowMem of the retain set"),
            ("forget_text", load_text_split, names.forget_text or f"{names.forget}_text",
             names.forget_text is not None, "no Min-K% AUC / PrivLeak"),
            ("holdout_text", load_text_split, names.holdout_text, False, "no Min-K% AUC / PrivLeak"),
        ]
    # ra, wf and holdout only go with the TOFU sets; a forget text set already found is not
    # looked up again
    optional = [entry for entry in optional if entry[0] not in sets
                and (entry[0] not in ("ra", "wf", "holdout") or "forget" in sets)]
    for key, loader, split, explicit, consequence in optional:
        try:
            sets[key] = loader(data, split)
        except SplitNotFound:
            if explicit:
                raise
            note(f"note: no {split!r} split in {data}; {consequence}")
    if "forget_knowmem" in sets or "retain_knowmem" in sets:
        try:
            sets["knowmem_icl"] = load_qa_split(data, names.knowmem_icl)
        except SplitNotFound:
            note(f"note: no {names.knowmem_icl!r} split; MUSE KnowMem is asked zero-shot")
    if ("forget_text" in sets) != ("holdout_text" in sets):
        sets.pop("forget_text", None)
        sets.pop("holdout_text", None)
    return sets


def _retain_eval_set(data: str, names: SplitNames, note) -> list[dict]:
    """TOFU's ``retain_perturbed`` (the retain QA every TOFU evaluation scores) when the data
    has it and it belongs to the retain split; else the first ``retain_size`` retain pairs."""
    retain = load_qa_split(data, names.retain)
    if names.retain_eval and not Path(data).is_file():
        try:
            chosen = load_qa_split(data, names.retain_eval)
        except SplitNotFound:
            chosen = None
        if chosen is not None:
            retain_questions = {r["question"] for r in retain}
            outside = sum(r["question"] not in retain_questions for r in chosen)
            if not outside:
                return chosen
            note(f"note: {outside} of the {len(chosen)} {names.retain_eval!r} pairs are not in "
                 f"{names.retain!r} (they would be forgotten); scoring the first "
                 f"{names.retain_size} {names.retain!r} pairs instead")
            return retain[:names.retain_size]
    note(f"note: no {names.retain_eval!r} split; model utility scores the first "
         f"{names.retain_size} {names.retain!r} pairs (--eval-retain-size)")
    return retain[:names.retain_size]


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
                   options: EvalOptions, note=print) -> dict[str, MetricResult]:
    """Every metric the sets allow; ``note`` gets what could not be computed and why.
    Collective: every rank calls it, every rank gets the results."""
    reference = reference or Reference()
    tofu_sets = {k: sets[k] for k in ("forget", "retain", "ra", "wf", "holdout") if k in sets}
    results = {}
    if tofu_sets:
        tofu_results, notes = evaluate_tofu(
            engine, tokenizer, tofu_sets, reference=reference, max_length=options.max_length,
            batch_size=options.batch_size, max_new_tokens=options.max_new_tokens,
            use_stemmer=options.use_stemmer)
        results.update(tofu_results)
        for line in notes:
            note(line)
    muse_sets = {k: sets[k] for k in ("verbmem", "forget_text", "holdout_text", "forget_knowmem",
                                      "retain_knowmem", "knowmem_icl") if k in sets}
    if muse_sets:
        results.update(evaluate_muse(engine, tokenizer, muse_sets, reference=reference,
                                     max_length=options.max_length, batch_size=options.batch_size,
                                     verbmem_max_new_tokens=options.verbmem_max_new_tokens,
                                     knowmem_max_new_tokens=options.knowmem_max_new_tokens,
                                     use_stemmer=options.use_stemmer))
    return results
