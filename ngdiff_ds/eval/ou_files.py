"""Results files in open-unlearning's layout: ``TOFU_EVAL.json``, ``TOFU_SUMMARY.json``,
``MUSE_EVAL.json``, ``MUSE_SUMMARY.json``, so that tools written for open-unlearning (OU,
github.com/locuslab/open-unlearning) can read this package's evaluation points.

The layout, and the OU file each fact was checked against (commit d3d7cf9, Dec 2025):

* File names are ``<BENCHMARK>_EVAL.json`` (every entry) and ``<BENCHMARK>_SUMMARY.json``
  (metric -> aggregate) in one directory per evaluation (``src/evals/base.py``,
  ``get_logs_file_path``; the names ``TOFU`` and ``MUSE`` come from ``src/evals/tofu.py`` and
  ``src/evals/muse.py``).
* ``*_EVAL.json`` maps a metric name to ``{"agg_value": x, "value_by_index": {"0": {...}}}``
  and holds every metric *and every pre-compute* of one (``src/evals/metrics/base.py``: each
  evaluated metric, pre-computes included, is stored in the shared cache under its own name,
  and that cache is the file). Metrics defined on whole sets only (``forget_quality``,
  ``model_utility``, ``privleak``) have no ``value_by_index`` (``src/evals/metrics/privacy.py``,
  ``utility.py``). Top-level keys are sorted and the file is indented by 4
  (``Evaluator.save_logs``).
* ROUGE rows hold ``rouge1_recall``, ``rougeL_f1``, ``rougeL_recall``, ``input``,
  ``ground_truth``, ``generation`` (``src/evals/metrics/utils.py``, ``eval_text_similarity``);
  probability rows hold ``prob`` and ``avg_loss``, lists of them for perturbed answers
  (``evaluate_probability``, ``run_batchwise_evals``); truth-ratio, extraction-strength,
  exact-memorisation and attack rows hold ``score`` (``memorization.py``, ``mia/all_attacks.py``).
* A membership attack (``mia_min_k``, ``mia_loss``, ``mia_zlib``, ``mia_min_k_plus_plus``,
  ``mia_reference``, ``mia_gradnorm``) is ``{"forget": {agg_value, value_by_index},
  "holdout": {...}, "auc": x, "agg_value": x}`` (``src/evals/metrics/mia/utils.py``,
  ``mia_auc``). The names are the same in TOFU and MUSE: the file tells the two apart
  (``configs/eval/tofu_metrics/mia_*.yaml``, ``configs/eval/muse_metrics/mia_*.yaml``).
* The summary lists the metrics the benchmark's config names, not their pre-computes
  (``Evaluator.summarize``). The defaults are ``TOFU_SUMMARY_KEYS``
  (``configs/eval/tofu.yaml``; ``forget_truth_ratio`` is the key that
  ``tofu_metrics/forget_Truth_Ratio.yaml`` declares) and ``MUSE_SUMMARY_KEYS``
  (``configs/eval/muse.yaml``). ``mia_min_k`` is not a MUSE summary key: it is in
  ``MUSE_EVAL.json`` as the pre-compute of ``privleak``.

Where this writer departs from OU, and why:

* OU leaves a summary key out when its aggregate is ``None``; here every summary key is
  written, ``null`` when its metric is missing or not finite, so the file's key set is fixed
  and a reader gets ``None`` rather than a ``KeyError``. The reason goes to a separate flat
  file, ``<BENCHMARK>_SUMMARY.notes.json`` (key -> sentence), written beside every summary
  (``{}`` when there is nothing to say) so that the summary itself stays the flat
  metric -> number mapping OU readers expect and a notes file never outlives its summary.
* Strict JSON: NaN and +-inf are written as ``null`` everywhere (OU's ``json.dump`` would
  write the non-standard ``NaN`` token).
* Files are written atomically (a temporary file in the same directory, then ``os.replace``),
  and all of one call's files are serialised before the first is written, so a bad value
  leaves the previous files as they were.

The caller passes each benchmark's results under OU's names (``TOFU_METRIC_NAMES`` and
``MUSE_METRIC_NAMES`` list every name OU's metric configs define); names outside them
(``model_utility_partial``, say) are written to the EVAL file too and ignored by OU readers.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Mapping

from ngdiff_ds.errors import DataError
from ngdiff_ds.eval.results import MetricResult, json_safe

# configs/eval/tofu.yaml, in its order.
TOFU_SUMMARY_KEYS = (
    "forget_truth_ratio", "forget_quality", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
    "model_utility", "privleak", "extraction_strength",
)
# configs/eval/muse.yaml, in its order.
MUSE_SUMMARY_KEYS = (
    "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE", "privleak",
    "extraction_strength",
)

_ATTACKS = frozenset({
    "mia_min_k", "mia_loss", "mia_zlib", "mia_min_k_plus_plus", "mia_reference", "mia_gradnorm",
})
# The "@package eval.tofu.metrics.<name>" line of each configs/eval/tofu_metrics/*.yaml.
TOFU_METRIC_NAMES = frozenset({
    "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_Q_A_PARA_Prob", "forget_Q_A_PARA_ROUGE",
    "forget_Q_A_PERT_Prob", "forget_Q_A_PERT_ROUGE", "forget_Q_A_gibberish",
    "forget_truth_ratio", "forget_quality",
    "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Q_A_PARA_Prob", "retain_Q_A_PERT_Prob",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob", "ra_Q_A_PERT_Prob", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
    "wf_Q_A_Prob", "wf_Q_A_PERT_Prob", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio",
    "model_utility", "privleak", "extraction_strength", "exact_memorization",
}) | _ATTACKS
# The "@package eval.muse.metrics.<name>" line of each configs/eval/muse_metrics/*.yaml.
MUSE_METRIC_NAMES = frozenset({
    "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE", "forget_gibberish",
    "privleak", "extraction_strength", "exact_memorization",
}) | _ATTACKS

_SUMMARY_KEYS = {"TOFU": TOFU_SUMMARY_KEYS, "MUSE": MUSE_SUMMARY_KEYS}

Results = Mapping[str, "MetricResult | Mapping[str, Any]"]
Notes = Mapping[str, Mapping[str, str]]


def write_ou_files(
    directory: str | Path,
    tofu_results: Results | None,
    muse_results: Results | None,
    notes: Notes | None = None,
) -> list[Path]:
    """Write ``<directory>/{TOFU,MUSE}_{EVAL,SUMMARY}.json`` and ``*_SUMMARY.notes.json``.

    ``tofu_results`` and ``muse_results`` map OU's metric names to ``MetricResult`` objects or
    dicts in the results layout (a membership attack's dict with ``forget``, ``holdout``,
    ``auc`` and ``agg_value`` is kept as it is). A benchmark whose mapping is empty (or None)
    gets no files. ``notes`` is ``{"TOFU": {key: reason}, "MUSE": {...}}``: the caller's
    reasons, which replace the automatic one for a null summary key and are written as they
    are for any other key. Returns the paths written.

    Raises ``TypeError`` for a value that has no JSON form, before any file is written.
    """
    notes = _checked_notes(notes)
    directory = Path(directory)
    payloads: dict[Path, Any] = {}
    for benchmark, results in (("TOFU", tofu_results), ("MUSE", muse_results)):
        if results:
            payloads.update(_benchmark_files(directory, benchmark, results, notes.get(benchmark, {})))
    texts = {path: _strict_json(payload) for path, payload in payloads.items()}
    if texts:
        directory.mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        _write_atomically(path, text)
    return list(texts)


def read_ou_summary(path: str | Path) -> dict[str, float | None]:
    """A ``*_SUMMARY.json``: metric -> number, ``None`` where the file has ``null``.

    Raises ``DataError`` naming the file when it cannot be read, is not strict JSON (a
    ``NaN`` token included) or is not an object of numbers and nulls.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the summary file ({error})") from error
    try:
        table = json.loads(text, parse_constant=_refuse_non_finite)
    except ValueError as error:
        raise DataError(f"{path}: not a strict JSON file ({error})") from error
    if not isinstance(table, dict):
        raise DataError(f"{path}: a summary is a JSON object of metric -> number, "
                        f"got a {type(table).__name__}")
    return {name: _summary_number(path, name, value) for name, value in table.items()}


# --------------------------------------------------------------------------- one benchmark


def _benchmark_files(directory: Path, benchmark: str, results: Results,
                     caller_notes: Mapping[str, str]) -> dict[Path, Any]:
    _check_names(benchmark, results)
    summary, reasons = _summary_with_reasons(benchmark, results)
    return {
        directory / f"{benchmark}_EVAL.json": _eval_layout(benchmark, results),
        directory / f"{benchmark}_SUMMARY.json": summary,
        directory / f"{benchmark}_SUMMARY.notes.json": dict(sorted({**reasons, **caller_notes}.items())),
    }


def _eval_layout(benchmark: str, results: Results) -> dict[str, Any]:
    """Every entry, sorted by name as OU sorts it, with only JSON values in it."""
    return {name: _entry_layout(benchmark, name, results[name]) for name in sorted(results)}


def _entry_layout(benchmark: str, name: str, entry: Any) -> Any:
    where = f"{benchmark} result {name!r}"
    if isinstance(entry, MetricResult):
        layout: dict[str, Any] = {"agg_value": entry.agg_value}
        if entry.value_by_index:  # set-level metrics have none in OU's files
            layout["value_by_index"] = entry.value_by_index
        return json_safe(layout, where)
    if isinstance(entry, Mapping):
        return json_safe(entry, where)
    raise TypeError(f"{where} is a {type(entry).__name__}, not a MetricResult or a dict "
                    "in the results layout")


def _summary_with_reasons(benchmark: str, results: Results) -> tuple[dict[str, float | None], dict[str, str]]:
    """Summary key -> finite aggregate or None, and key -> why it is None."""
    summary, reasons = {}, {}
    for key in sorted(_SUMMARY_KEYS[benchmark]):
        value, reason = _summary_value(benchmark, key, results)
        summary[key] = value
        if reason is not None:
            reasons[key] = reason
    return summary, reasons


def _summary_value(benchmark: str, key: str, results: Results) -> tuple[float | None, str | None]:
    if key not in results:
        return None, _missing_reason(benchmark, key, results)
    aggregate = _aggregate_of(results[key])
    if aggregate is _ABSENT:
        return None, f"{key} has no agg_value in {benchmark}_EVAL.json"
    value = _finite_number(aggregate, f"{benchmark} result {key!r} agg_value")
    if value is None:
        return None, f"{key}'s agg_value is {_describe_non_finite(aggregate)}; written as null"
    return value, None


def _missing_reason(benchmark: str, key: str, results: Results) -> str:
    partial = f"{key}_partial"
    if partial in results:
        return (f"{key} was not computed (not all of its components are there); "
                f"{partial}, over the components there are, is in {benchmark}_EVAL.json")
    return f"{key} was not computed at this evaluation point (not in the {benchmark} results)"


_ABSENT = object()


def _aggregate_of(entry: Any) -> Any:
    if isinstance(entry, MetricResult):
        return entry.agg_value
    if isinstance(entry, Mapping):
        return entry.get("agg_value", _ABSENT)
    return _ABSENT


def _describe_non_finite(value: Any) -> str:
    if value is None:
        return "None (the metric produced no value)"
    value = float(value)
    return "NaN" if math.isnan(value) else ("+inf" if value > 0 else "-inf")


# --------------------------------------------------------------------------- JSON values


def _finite_number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, numbers.Real):
        value = value.tolist()  # a 0-d array or tensor
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} is {value!r}, not a number")
    return _finite_or_none(float(value))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _strict_json(payload: Any, indent: int = 4) -> str:
    return json.dumps(payload, indent=indent, allow_nan=False) + "\n"


def write_strict_json(path: str | Path, payload: Any, indent: int = 4) -> None:
    """``payload`` as strict JSON (no NaN), written atomically (see ``_write_atomically``)."""
    _write_atomically(Path(path), _strict_json(json_safe(payload, str(path)), indent))


def _refuse_non_finite(token: str) -> None:
    raise ValueError(f"{token} is not a JSON number")


def _summary_number(path: Path, name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{path}: {name!r} is {value!r}, not a number or null")
    return float(value)


# --------------------------------------------------------------------------- checks, writing


def _check_names(benchmark: str, results: Results) -> None:
    for name in results:
        if not isinstance(name, str):
            raise TypeError(f"{benchmark} result names must be strings, got {name!r}")


def _checked_notes(notes: Notes | None) -> dict[str, Mapping[str, str]]:
    notes = dict(notes or {})
    unknown = sorted(set(notes) - set(_SUMMARY_KEYS))
    if unknown:
        raise ValueError(f"notes are keyed by benchmark ({sorted(_SUMMARY_KEYS)}), got {unknown}")
    for benchmark, reasons in notes.items():
        for key, reason in reasons.items():
            if not isinstance(key, str) or not isinstance(reason, str):
                raise TypeError(f"{benchmark} note {key!r}: {reason!r} is not a string -> string entry")
    return notes


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new, never a part.

    The temporary file is opened normally (not with ``mkstemp``'s 0600) so the result has
    the umask's permissions and others on a shared file system can read it.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
