"""Reporting evaluation results: the results and summary files (the open-unlearning schema),
the stdout table, and the trade-off plot of a run."""

from __future__ import annotations

import json
from pathlib import Path

from ngdiff_ds.eval.results import summary as summarise
from ngdiff_ds.eval.results import to_results

TABLE_METRICS = (
    # TOFU
    "forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio",
    "retain_Q_A_Prob", "retain_Q_A_ROUGE", "wf_Q_A_ROUGE",
    # MUSE
    "forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_text_min_k",
    "holdout_text_min_k", "mia_min_k", "privleak",
)


def write_results(results: dict, out_dir: str | Path, tag: str) -> dict[str, float]:
    """``<tag>_results.json`` (per example) and ``<tag>_summary.json``; returns the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = to_results(results)
    (out_dir / f"{tag}_results.json").write_text(json.dumps(full, indent=1))
    summary = summarise(full)
    (out_dir / f"{tag}_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """Metrics as rows, one column per evaluated model."""
    names = [m for m in TABLE_METRICS if any(m in c for c in columns.values())]
    width = max(len(n) for n in names) + 2
    lines = [" " * width + "".join(f"{title:>16s}" for title in columns)]
    for name in names:
        cells = "".join(f"{c[name]:>16.4g}" if name in c else f"{'-':>16s}" for c in columns.values())
        lines.append(f"{name:<{width}s}{cells}")
    return "\n".join(lines)


def plot_trajectory(points: list[dict], path: str | Path) -> None:
    """PNG of forget quality (log scale) against model utility over the evaluation points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [p for p in points if "forget_quality" in p and "model_utility" in p]
    if not usable:
        return
    figure, axes = plt.subplots(figsize=(5, 4))
    xs = [p["model_utility"] for p in usable]
    ys = [max(p["forget_quality"], 1e-30) for p in usable]
    axes.plot(xs, ys, "-o")
    for p, x, y in zip(usable, xs, ys):
        axes.annotate(str(p["label"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_yscale("log")
    axes.set_xlabel("model utility")
    axes.set_ylabel("forget quality (KS p-value)")
    axes.set_title("TOFU trade-off over the run")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
