"""How robust is the adaptive rate to the starting rate? The main command's unlearning from
several start rates, with the adaptive rate and with the rate fixed, side by side.

Each run is the main command (embedded default unless --model/--data are given in --extra):

    deepspeed --num_gpus 2 launch/unlearn.py --deepspeed ds_configs/zero3.json --no-eval \\
        --lr START --max-steps 40 [--no-adaptive-lr]

Run (CPU: 10.7 min measured on 2 cores for the 10 runs, about 65 s each, start-up included):

    DS_ACCELERATOR=cpu python benchmarks/lr_robustness.py --output-dir runs/lr_robustness

    # also forget quality and model utility before and after (measured: 2.6 min per run)
    DS_ACCELERATOR=cpu python benchmarks/lr_robustness.py --with-eval

    # trying a rule setting: any unlearn.py flag, applied to the adaptive runs only
    DS_ACCELERATOR=cpu python benchmarks/lr_robustness.py --extra="--lr-period 4"

    # GeN's published rule on the same starts (clamp [0.5, 2], smoothing 0.9, no budget)
    DS_ACCELERATOR=cpu python benchmarks/lr_robustness.py --modes gen

Prints one table (what the fits did, rate at the end, the step from which the rate stays
below 1e-3,
forget and retain NLL of the training targets before -> after) and the issue's acceptance
checks; writes ``results.json`` (every run's per-step rate and fits) and
``lr_trajectories.png`` (the rate every step moved the weights with, a backtracked step at
the rate it was retaken at; log scale; solid adaptive, dashed fixed).
A run whose output directory already holds a summary.json written with the same settings is
read, not rerun (--rerun forces it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unlearn_runs import run_once, save_plot, unlearn_command  # noqa: E402
DEFAULT_STARTS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
BELOW = 1e-3  # "the rate below 1e-3 by step 16": from then on (acceptance of the 1e-2 start)
# mode "gen": GeN's published rule on the same runs (Bu & Xu 2024): the parabola's minimum
# only (no rise budget, no backtracking), the new rate clamped to [0.5, 2] x the old one and
# smoothed as lr <- 0.9 lr + 0.1 proposal (our --lr-smoothing is the weight of the proposal)
GEN_PUBLISHED = ["--lr-max-rise", "0", "--lr-clip-low", "0.5", "--lr-clip-high", "2",
                 "--lr-smoothing", "0.1", "--lr-no-refit"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=float, nargs="+", default=list(DEFAULT_STARTS))
    parser.add_argument("--modes", nargs="+", choices=("adaptive", "fixed", "gen"),
                        default=["adaptive", "fixed"],
                        help="adaptive: the package's defaults; fixed: --no-adaptive-lr; gen: "
                             "GeN's published rule")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ranks", type=int, default=2, help="ranks per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (CPU: share the cores)")
    parser.add_argument("--deepspeed", default="ds_configs/zero3.json")
    parser.add_argument("--output-dir", default="runs/lr_robustness")
    parser.add_argument("--with-eval", action="store_true",
                        help="also evaluate before and after (forget quality, model utility)")
    parser.add_argument("--extra", default="", help="more unlearn.py flags for adaptive runs")
    parser.add_argument("--extra-all", default="", help="more unlearn.py flags for every run")
    parser.add_argument("--rerun", action="store_true", help="rerun runs that have a summary")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.ranks < 1 or args.jobs < 1:
        parser.error("--steps, --ranks and --jobs must be >= 1")
    if any(not (start > 0 and math.isfinite(start)) for start in args.starts):
        parser.error("--starts must be positive rates")
    return args


def run_name(mode: str, start: float) -> str:
    return f"{mode}_lr{start:.0e}"


def command_of(args, mode: str, start: float, out: Path) -> list[str]:
    flags = ["--deepspeed", args.deepspeed, "--lr", repr(start), "--max-steps", str(args.steps),
             "--output-dir", str(out)]
    flags += ["--eval-every", "0"] if args.with_eval else ["--no-eval"]
    flags += shlex.split(args.extra_all)
    if mode == "fixed":
        flags += ["--no-adaptive-lr"]
    elif mode == "gen":
        flags += GEN_PUBLISHED
    else:
        flags += shlex.split(args.extra)
    return unlearn_command(args.ranks, flags)


def run_one(args, mode: str, start: float) -> dict:
    out = Path(args.output_dir) / run_name(mode, start)
    ran = run_once(command_of(args, mode, start, out), out,
                   f"lr_robustness {run_name(mode, start)}",
                   threads_per_rank=max(1, (os.cpu_count() or 1) // (args.ranks * args.jobs)),
                   rerun=args.rerun)
    return dict(read_run(out, mode, start), ran=ran)


def read_run(out: Path, mode: str, start: float) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fits = [{k: row.get(k) for k in ("step", "reason", "rule", "optimal_multiple", "lr_before",
                                     "lr_after", "step_multiple")}
            for row in rows if row["kind"] == "lr_fit"]
    # the rate each step moved the weights with: a backtracked step at the rate it was
    # retaken at (the rate it was started with times the multiple it was shortened to);
    # by step number, the last row of a step winning (a resumed run repeats steps)
    shortened = {f["step"]: f.get("step_multiple") or 1.0 for f in fits}
    started = {row["step"]: row["lr"] for row in rows if row["kind"] == "train"}
    rates = [started[step] * shortened.get(step, 1.0) for step in sorted(started)]
    final_eval = [row for row in rows if row["kind"] == "unlearning_metrics"]
    record = {"mode": mode, "start": start, "rates": rates, "fits": fits,
              "before": summary["before"], "after": summary["after"],
              "final_rate": rates[-1] if rates else None,
              "first_step_below": next((i for i in range(len(rates))
                                        if max(rates[i:]) < BELOW), None)}
    if final_eval:
        first, last = final_eval[0], final_eval[-1]
        # None where a point has no such key (no reference: no forget quality; some
        # components missing: model_utility_partial instead)
        record["eval"] = {k: (first.get(k), last.get(k)) for k in
                          ("forget_quality", "model_utility", "forget_Q_A_Prob",
                           "retain_Q_A_Prob")}
    return record


def ratio(record: dict, key: str) -> float:
    return record["after"][key] / record["before"][key]


def fit_counts(record: dict) -> str:
    """How many fits set the rate (GeN's minimum or the rise budget), shortened the step
    just taken, or kept the rate (refused)."""
    rules = [f.get("rule") or ("fit" if f["reason"] == "accepted" else "kept")
             for f in record["fits"]]
    moved = sum(rule in ("fit", "rise budget") for rule in rules)
    return f"{moved} / {rules.count('backtrack')} / {rules.count('kept')}"


def table(records: list[dict]) -> str:
    with_eval = any("eval" in r for r in records)
    head = ["start rate", "rate", "fits: moved / backtracked / kept", "rate at the end",
            f"rate < {BELOW:g} from step",
            "forget NLL", "retain NLL"]
    if with_eval:
        head += ["forget quality", "model utility"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [f"{r['start']:.0e}", r["mode"], fit_counts(r) if r["mode"] != "fixed" else "-",
                 f"{r['final_rate']:.2g}",
                 "-" if r["first_step_below"] is None else str(r["first_step_below"]),
                 f"{r['before']['forget_nll']:.3f} -> {r['after']['forget_nll']:.3f} "
                 f"({ratio(r, 'forget_nll'):.1f}x)",
                 f"{r['before']['retain_nll']:.3f} -> {r['after']['retain_nll']:.3f} "
                 f"({ratio(r, 'retain_nll'):.2f}x)"]
        if with_eval:
            values = r.get("eval", {})
            cells += [" -> ".join("-" if v is None else f"{v:.3g}"
                                  for v in values.get(key, (None, None)))
                      for key in ("forget_quality", "model_utility")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def acceptance(records: list[dict]) -> list[tuple[bool, str]]:
    """The issue's checks on these runs (only those whose runs are present)."""
    by = {(r["mode"], r["start"]): r for r in records}
    checks = []
    for (mode, start), r in sorted(by.items()):
        if mode != "adaptive":
            continue
        forget, retain = ratio(r, "forget_nll"), ratio(r, "retain_nll")
        if start <= 1e-3 * 1.0001:
            checks.append((retain <= 2 and forget >= 3, f"start {start:.0e}: retain {retain:.2f}x "
                                                       f"<= 2x and forget {forget:.1f}x >= 3x"))
        else:
            below = r["first_step_below"]
            checks.append((retain <= 5 and below is not None and below <= 16,
                           f"start {start:.0e}: retain {retain:.2f}x <= 5x and rate < {BELOW:g} "
                           f"from step 16 on at the latest (from step {below})"))
        fixed = by.get(("fixed", start))
        if fixed is not None and start == min(s for _, s in by):
            checks.append((forget > ratio(fixed, "forget_nll"),
                           f"start {start:.0e}: adaptive forgets more than fixed "
                           f"({forget:.1f}x vs {ratio(fixed, 'forget_nll'):.1f}x)"))
        if fixed is not None and start == max(s for _, s in by):
            checks.append((retain < ratio(fixed, "retain_nll"),
                           f"start {start:.0e}: adaptive damages retain less than fixed "
                           f"({retain:.2f}x vs {ratio(fixed, 'retain_nll'):.2f}x)"))
    return checks


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8.5, 4.2))
    colours = plt.cm.viridis([i / max(1, len(records) - 1) for i in range(len(records))])
    starts = sorted({r["start"] for r in records})
    for r in records:
        colour = colours[starts.index(r["start"]) * (len(records) - 1) // max(1, len(starts) - 1)]
        axes.plot(range(len(r["rates"])), r["rates"], color=colour,
                  linestyle={"adaptive": "-", "fixed": "--"}.get(r["mode"], ":"),
                  label=f"{r['start']:.0e} {r['mode']}")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("learning rate")
    axes.set_title("rate of each step (a backtracked step at its retaken rate); solid adaptive, "
                   "dashed fixed, dotted GeN", fontsize=9)
    save_plot(figure, axes, path, legend_title="start, rate")


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(mode, start) for start in args.starts for mode in args.modes]
    print(f"[lr_robustness] {len(plan)} runs of {args.steps} steps on {args.ranks} rank(s), "
          f"{args.jobs} at a time, into {out}", flush=True)
    began = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda job: run_one(args, *job), plan))
    seconds = time.perf_counter() - began
    text = table(records)
    checks = acceptance(records)
    report = "\n".join([text, "", *(f"[{'pass' if ok else 'FAIL'}] {what}" for ok, what in checks),
                        f"\nran {sum(r['ran'] for r in records)} of {len(plan)} runs in "
                        f"{seconds / 60:.1f} min (the others were read from their directories)"])
    print(report)
    (out / "table.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "seconds": seconds, "runs": records,
         "checks": [{"passed": ok, "check": what} for ok, what in checks]}, indent=1))
    plot(records, out / "lr_trajectories.png")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'lr_trajectories.png'}")
    if not all(ok for ok, _ in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
