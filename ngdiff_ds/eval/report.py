"""Reporting evaluation results: the results and summary files (the package's merged table,
and open-unlearning's TOFU/MUSE files), the stdout table, and the trade-off plot of a run."""

from __future__ import annotations

from pathlib import Path

from ngdiff_ds.eval.ou_files import write_ou_files, write_strict_json
from ngdiff_ds.eval.results import summary as summarise
from ngdiff_ds.eval.results import to_results

TABLE_METRICS = (
    # TOFU
    "forget_quality", "model_utility", "model_utility_partial", "forget_Q_A_Prob",
    "forget_Q_A_ROUGE", "forget_truth_ratio", "retain_Q_A_Prob", "retain_Q_A_ROUGE",
    "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE",
    "extraction_strength", "exact_memorization", "tofu_mia_min_k", "tofu_mia_loss",
    "tofu_privleak",
    # MUSE
    "forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE",
    "forget_qa_knowmem_ROUGE", "forget_text_min_k", "holdout_text_min_k", "mia_min_k",
    "mia_loss", "mia_zlib", "mia_min_k_plus_plus", "mia_reference", "privleak",
)
# The MUSE side of a merged results mapping; everything else is TOFU's (its QA-side attacks
# under ``tofu_``, written under open-unlearning's names in TOFU_EVAL.json).
MUSE_METRICS = ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE",
                "forget_text_min_k", "holdout_text_min_k", "mia_min_k", "mia_loss", "mia_zlib",
                "mia_min_k_plus_plus", "mia_reference", "mia_gradnorm", "privleak")
SETTINGS_KEY = "eval_settings"  # not a metric: how the results were computed


def ou_families(results: dict) -> tuple[dict, dict]:
    """The merged results as open-unlearning's two files name them: (TOFU, MUSE)."""
    tofu, muse = {}, {}
    for name, value in results.items():
        if name == SETTINGS_KEY:
            continue
        if name in MUSE_METRICS:
            muse[name] = value
        else:
            tofu[name.removeprefix("tofu_")] = value
    return tofu, muse


def write_results(results: dict, out_dir: str | Path, tag: str,
                  settings: dict | None = None) -> dict[str, float]:
    """``<tag>_results.json`` (every metric, per example, and ``eval_settings``: how they were
    computed), ``<tag>_summary.json``, and open-unlearning's ``TOFU_EVAL.json``,
    ``TOFU_SUMMARY.json``, ``MUSE_EVAL.json``, ``MUSE_SUMMARY.json`` (and their
    ``*.notes.json``: why a summary key is null) under ``<tag>/``; returns the summary.
    Strict JSON: a NaN is written as null."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = to_results(results)
    summary = summarise(full)
    if settings:
        full[SETTINGS_KEY] = settings
    write_strict_json(out_dir / f"{tag}_results.json", full, indent=1)
    write_strict_json(out_dir / f"{tag}_summary.json", summary, indent=2)  # NaN -> null
    tofu, muse = ou_families(results)
    notes = {}
    if settings and muse:
        notes["MUSE"] = {"forget_verbmem_ROUGE": f"ROUGE stemming: {settings['rouge_stemming']} "
                                                 "(--rouge-stemming)"}
    write_ou_files(out_dir / tag, tofu, muse, notes)
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

    # TOFU's 9-component utility, else the partial one (and the axis says so)
    utility = "model_utility" if any("model_utility" in p for p in points) \
        else "model_utility_partial"
    usable = [p for p in points if "forget_quality" in p and utility in p]
    if not usable:
        return
    figure, axes = plt.subplots(figsize=(5, 4))
    xs = [p[utility] for p in usable]
    ys = [max(p["forget_quality"], 1e-30) for p in usable]
    axes.plot(xs, ys, "-o")
    for p, x, y in zip(usable, xs, ys):
        axes.annotate(str(p["label"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_yscale("log")
    axes.set_xlabel(utility.replace("_", " "))
    axes.set_ylabel("forget quality (KS p-value)")
    axes.set_title("TOFU trade-off over the run")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
