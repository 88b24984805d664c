"""Merge throughput records (benchmarks/throughput.py) of several rank and node counts into one
scaling table and plot.

    python benchmarks/scaling_report.py runs/throughput/*/throughput.json --output-dir runs/scaling
    python benchmarks/scaling_report.py runs/scaling/weak           # every throughput.json below

Records are grouped into studies: the same model, sequence length, precision, checkpointing and
K, and the same scaling kind (weak: the same per-rank micro-batch; strong: the same global
batch). Within a study each record's scaling efficiency, per mode, is measured against the
study's smallest run (fewest ranks, then fewest nodes):

    efficiency = tokens/s / (ranks / ranks_1 * tokens/s_1)

which is the weak-scaling efficiency; with a fixed global batch it is also the strong-scaling
one (speed-up over the ideal ranks / ranks_1). Writes scaling.json, scaling.md and scaling.png
under --output-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODES = ("ngdiff", "ngdiff_adaptive", "floor", "gdiff")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="+",
                        help="throughput.json files, or directories searched for them")
    parser.add_argument("--output-dir", default="runs/scaling")
    return parser.parse_args(argv)


def record_paths(arguments: list[str]) -> list[Path]:
    """The JSON files named, and every throughput.json under the directories named."""
    paths = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            paths += sorted(path.rglob("throughput.json"))
        elif path.is_file():
            paths.append(path)
        else:
            raise SystemExit(f"error: {argument}: no such file or directory")
    if not paths:
        raise SystemExit(f"error: no throughput.json in {', '.join(arguments)}")
    return paths


def load_records(paths: list[Path]) -> list[dict]:
    records = []
    for path in paths:
        record = json.loads(path.read_text())
        if record.get("benchmark") != "throughput" or "modes" not in record:
            raise SystemExit(f"error: {path} is not a throughput.json record")
        record["_path"] = str(path)
        records.append(record)
    return records


def study_key(record: dict) -> tuple:
    """What must be equal for two records to belong to one scaling study."""
    model = record["model"]
    size = (model["parameters"], model["hidden_size"], model["layers"], model["vocab_size"])
    batch = record["micro_batch_size"] if record["scaling"] == "weak" else record["global_batch"]
    return (record["scaling"], size, record["seq_len"], record["precision"],
            record["gradient_checkpointing"], record["accum"], batch)


def study_name(record: dict) -> str:
    model = record["model"]
    batch = (f"micro-batch {record['micro_batch_size']}/rank" if record["scaling"] == "weak"
             else f"global batch {record['global_batch']}")
    return (f"{record['scaling']}: {model['parameters'] / 1e6:.1f}M params, seq "
            f"{record['seq_len']}, {record['precision']}, {batch}, K={record['accum']}"
            f"{', checkpointing' if record['gradient_checkpointing'] else ''}")


def efficiency(tokens_per_s: float, ranks: int, base_tokens_per_s: float, base_ranks: int) -> float:
    """Measured tokens/s over the ideal: the base run's tokens/s times ranks / base ranks."""
    return tokens_per_s / (ranks / base_ranks * base_tokens_per_s)


def scaling_rows(records: list[dict]) -> list[dict]:
    """One row per record, with its study, tokens/s and efficiency per mode."""
    studies: dict[tuple, list[dict]] = {}
    for record in records:
        studies.setdefault(study_key(record), []).append(record)
    rows = []
    for members in studies.values():
        members.sort(key=lambda r: (r["world_size"], r["nodes"]))
        base = members[0]
        for record in members:
            row = {"study": study_name(record), "scaling": record["scaling"],
                   "nodes": record["nodes"], "ranks": record["world_size"],
                   "hosts": record.get("hosts"), "global_batch": record["global_batch"],
                   "micro_batch_size": record["micro_batch_size"],
                   "device": record.get("device_name"), "record": record["_path"],
                   "baseline_record": base["_path"], "tokens_per_s": {}, "efficiency": {}}
            for mode in MODES:
                if mode in record["modes"] and mode in base["modes"]:
                    rate = record["modes"][mode]["tokens_per_s"]
                    row["tokens_per_s"][mode] = rate
                    row["efficiency"][mode] = efficiency(
                        rate, record["world_size"], base["modes"][mode]["tokens_per_s"],
                        base["world_size"])
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    header = (["study", "nodes", "ranks", "global batch"]
              + [f"{m} tok/s" for m in MODES] + [f"{m} eff." for m in MODES])
    lines = ["# Scaling", "",
             "Efficiency = tokens/s / (ranks / ranks_1 x tokens/s_1) against the study's "
             "smallest run; tokens/s of all ranks together.", "",
             "| " + " | ".join(header) + " |", "| --- " + "| ---: " * (len(header) - 1) + "|"]
    for row in rows:
        rates = [f"{row['tokens_per_s'][m]:.0f}" if m in row["tokens_per_s"] else "-"
                 for m in MODES]
        effs = [f"{row['efficiency'][m]:.2f}" if m in row["efficiency"] else "-" for m in MODES]
        lines.append("| " + " | ".join([row["study"], str(row["nodes"]), str(row["ranks"]),
                                        str(row["global_batch"]), *rates, *effs]) + " |")
    return "\n".join(lines) + "\n"


def _label(row: dict) -> str:
    return f"{row['nodes']}n x {row['ranks'] // max(1, row['nodes'])}r"


def plot(rows: list[dict], path: Path) -> None:
    """Tokens/s and efficiency per run, one line per mode and study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, eff_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    studies = list(dict.fromkeys(row["study"] for row in rows))
    for study in studies:
        members = [row for row in rows if row["study"] == study]
        labels = [_label(row) for row in members]
        for mode in MODES:
            if all(mode in row["tokens_per_s"] for row in members):
                suffix = f" ({study.split(':')[0]})" if len(studies) > 1 else ""
                rate_ax.plot(labels, [row["tokens_per_s"][mode] for row in members], marker="o",
                             label=mode + suffix)
                eff_ax.plot(labels, [row["efficiency"][mode] for row in members], marker="o",
                            label=mode + suffix)
    eff_ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    rate_ax.set_ylabel("tokens/s (all ranks)")
    eff_ax.set_ylabel("scaling efficiency")
    for ax in (rate_ax, eff_ax):
        ax.set_xlabel("nodes x ranks per node")
        ax.legend(fontsize=7)
    fig.suptitle("; ".join(studies), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = scaling_rows(load_records(record_paths(args.records)))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    table = markdown(rows)
    (out / "scaling.md").write_text(table)
    plot(rows, out / "scaling.png")
    print(table)
    print(f"wrote {out}/scaling.json, scaling.md, scaling.png", file=sys.stderr)


if __name__ == "__main__":
    main()
