"""The results layout shared by every metric, and the input helpers and ROUGE they share.

Every metric returns a ``MetricResult``: ``agg_value`` (the number a results table shows)
and ``value_by_index`` (per-example values keyed by the example's position as a string,
e.g. ``{"0": {"prob": 0.3}, "1": {"prob": 0.5}}``), the layout of the community's results
files (open-unlearning's TOFU_EVAL.json / MUSE_EVAL.json). ``to_results`` builds the
JSON-ready dict and ``summary`` the name -> ``agg_value`` table.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Mapping, Sequence

import numpy as np

RougeVariant = Literal["recall", "f1"]

# rouge-score's Score field for each variant.
_ROUGE_SCORE_FIELD = {"recall": "recall", "f1": "fmeasure"}


@dataclass(frozen=True)
class MetricResult:
    """One metric: the aggregate and the per-example values.

    ``value_by_index`` maps the example's position (as a string, as in JSON) to a dict
    naming the per-example quantity, e.g. ``{"0": {"prob": 0.31}}``. Empty for metrics
    defined on whole sets only.
    """

    agg_value: float
    value_by_index: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"agg_value": ..., "value_by_index": ...}``; NaN and inf become None.

        Per-example entries are numbers, strings (the generation, input and ground truth kept
        beside a ROUGE value, as open-unlearning's files have them) or lists of numbers (the
        probability of each perturbed answer)."""
        return {
            "agg_value": _json_number(self.agg_value),
            "value_by_index": {
                index: {name: json_safe(value) for name, value in values.items()}
                for index, values in self.value_by_index.items()
            },
        }


def to_results(metrics: Mapping[str, MetricResult | Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{metric_name: {"agg_value": ..., "value_by_index": ...}}``, ready for ``json.dumps``.

    Non-finite numbers (NaN, +-inf) are written as ``None`` (JSON ``null``) because strict
    JSON has no NaN; ``summary`` reads them back as NaN. Entries may be ``MetricResult`` or
    dicts already in this format (kept whole: a membership attack's ``forget``, ``holdout``
    and ``auc`` beside its ``agg_value``).
    """
    return {name: result.to_dict() if isinstance(result, MetricResult) else json_safe(result, name)
            for name, result in metrics.items()}


def summary(results: Mapping[str, MetricResult | Mapping[str, Any]]) -> dict[str, float]:
    """Metric name -> ``agg_value``, from ``MetricResult`` objects or ``to_results`` output.

    A ``None`` aggregate (a NaN written to JSON) comes back as NaN.
    """
    table = {}
    for name, result in results.items():
        if isinstance(result, Mapping) and "agg_value" not in result:
            continue  # not a metric (e.g. the eval_settings record)
        value = _as_result(result).agg_value
        table[name] = math.nan if value is None else float(value)
    return table


def _as_result(result: MetricResult | Mapping[str, Any]) -> MetricResult:
    if isinstance(result, MetricResult):
        return result
    by_index = dict(result.get("value_by_index") or {})
    return MetricResult(agg_value=result["agg_value"], value_by_index=by_index)


def _json_number(value: Any) -> Any:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def json_safe(value: Any, where: str = "a results entry") -> Any:
    """Strict-JSON form of a results entry: NaN and +-inf as None, strings and bools kept,
    integers kept, mappings (integer keys as strings: example indices) and sequences item by
    item, NumPy / torch values through ``tolist``; ``TypeError`` naming ``where`` otherwise."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, Mapping):
        return {_json_key(key, where): json_safe(item, f"{where}[{key!r}]")
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _json_number(value)
    if hasattr(value, "tolist"):  # NumPy arrays and scalars, torch tensors
        return json_safe(value.tolist(), where)
    raise TypeError(f"{where}: a {type(value).__name__} has no JSON form")


def _json_key(key: Any, where: str) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return str(int(key))
    raise TypeError(f"{where}: key {key!r} is neither a string nor an integer")


def by_index(**per_example: np.ndarray) -> dict[str, dict[str, float]]:
    """``{"0": {name: value, ...}, ...}`` from equal-length arrays of per-example values."""
    lengths = {len(values) for values in per_example.values()}
    assert len(lengths) == 1, "per-example arrays must have equal lengths"
    (length,) = lengths
    return {
        str(index): {name: float(values[index]) for name, values in per_example.items()}
        for index in range(length)
    }


# --------------------------------------------------------------------------- input helpers


def as_float64(values: Any, name: str, ndim: int = 1, shape_name: str = "") -> np.ndarray:
    """float64 array of ``ndim`` dimensions (default 1) from a sequence, NumPy array or torch
    tensor (any device, any grad); ``shape_name`` says what the dimensions are in the error."""
    if hasattr(values, "detach"):  # torch tensor; avoids importing torch in this module
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        dimensions = {1: "one-dimensional", 2: "two-dimensional"}.get(ndim, f"{ndim}-dimensional")
        raise ValueError(f"{name} must be {dimensions}{shape_name}, got shape {array.shape}")
    return array


def as_ragged(rows: Any, name: str) -> list[np.ndarray]:
    """A list of 1-D float64 arrays (one per example; lengths may differ)."""
    if hasattr(rows, "detach") or isinstance(rows, np.ndarray):
        if np.ndim(rows) != 2:
            raise ValueError(f"{name} must be a list of lists or a 2-D array, got shape {tuple(rows.shape)}")
    return [as_float64(row, f"{name}[{i}]") for i, row in enumerate(rows)]


def require_examples(count: int, name: str) -> None:
    if count == 0:
        raise ValueError(f"{name} has no examples")


def require_same_length(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} differ in length: {len(a)} != {len(b)}")



def scores_of(values: Any, name: str) -> np.ndarray:
    """Per-example ``score`` values of a ``MetricResult``, or the values themselves."""
    if isinstance(values, MetricResult):
        return np.array([entry["score"] for entry in values.value_by_index.values()], dtype=np.float64)
    return as_float64(values, name)


def agg_of(value: float | MetricResult) -> float:
    return float(value.agg_value if isinstance(value, MetricResult) else value)


# --------------------------------------------------------------------------- ROUGE


@lru_cache(maxsize=None)
def _rouge_scorer(use_stemmer: bool):
    # Imported lazily: rouge_score pulls in nltk (about a second), needed only for ROUGE.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=use_stemmer)


def rouge_l(
    predictions: Sequence[str], references: Sequence[str], variant: str, use_stemmer: bool,
    inputs: Sequence[str] | None = None,
) -> MetricResult:
    """ROUGE-L ``variant`` (recall or F1) per example and its mean.

    Each per-example row holds what open-unlearning's rows hold: ``rouge1_recall``,
    ``rougeL_f1``, ``rougeL_recall``, and the ``generation``, ``ground_truth`` and (when
    given) ``input`` they were computed from, so other metrics can be computed from the file.
    """
    if variant not in _ROUGE_SCORE_FIELD:
        raise ValueError(f"rouge variant must be one of {sorted(_ROUGE_SCORE_FIELD)}, got {variant!r}")
    require_same_length("predictions", predictions, "references", references)
    require_examples(len(predictions), "predictions")
    if inputs is not None:
        require_same_length("predictions", predictions, "inputs", inputs)
    scorer = _rouge_scorer(use_stemmer)
    rows, chosen = {}, []
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        scores = scorer.score(target=reference, prediction=prediction)
        row = {"rouge1_recall": scores["rouge1"].recall, "rougeL_f1": scores["rougeL"].fmeasure,
               "rougeL_recall": scores["rougeL"].recall}
        chosen.append(row[f"rougeL_{variant}"])
        if inputs is not None:
            row["input"] = inputs[index]
        row.update(ground_truth=reference, generation=prediction)
        rows[str(index)] = row
    return MetricResult(float(np.mean(chosen)), rows)
