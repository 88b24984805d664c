"""Where does NGDiff stand? Every --method preset on the same engine, batches, step budget and
evaluation points: the baselines at fixed rates, each over a small rate sweep, NGDiff with its
adaptive rate and no sweep.

Each run is the main command with a preset (embedded default unless --extra-all names
--model/--data):

    deepspeed --num_gpus 2 launch/unlearn.py --deepspeed ds_configs/zero3.json \\
        --method gdiff --lr 1e-4 --max-steps 40 --eval-every 10

Run (CPU, 2 cores: 20 runs, 89 min measured, 138-581 s each; a run whose directory holds the
same finished run is read, not rerun, so an interrupted comparison continues where it
stopped):

    DS_ACCELERATOR=cpu python benchmarks/compare_methods.py --output-dir runs/compare_methods

    # the CI smoke test: two presets, 4 steps, one rate, short generations (minutes)
    DS_ACCELERATOR=cpu python benchmarks/compare_methods.py --quick --output-dir /tmp/cmp

The first run (NGDiff) also scores the retain-only reference and the starting model; the
others read the reference from it (--retain-results) and skip the starting model
(--no-eval-before): both are the same for every run. The rule that picks a baseline's rate:
each run is scored by its best evaluation point under --rule (default fq_keep_mu: the best
forget quality among points that keep >= 95 % of the starting model's utility; see
ngdiff_ds/eval/selection.py), and the rate with the best score is the method's. NGDiff's
single run is scored the same way.

Writes to --output-dir: ``table.md`` (every run at its final point and at its best point; the
picked rate marked), ``results.json`` (every point of every run), ``tradeoff.png`` (forget
quality, log axis, against model utility: one trajectory per method at its picked rate,
the other rates faint), and one directory per run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from unlearn_runs import run_once, save_plot, unlearn_command  # noqa: E402

from ngdiff_ds.eval.selection import RULES, best_point, model_utility  # noqa: E402
from ngdiff_ds.methods import PRESETS  # noqa: E402

DEFAULT_RATES = (3e-5, 1e-4, 3e-4)
# the table's columns: (summary key, header)
COLUMNS = (("forget_quality", "forget quality"), ("model_utility", "model utility"),
           ("forget_Q_A_Prob", "forget Prob"), ("retain_Q_A_Prob", "retain Prob"),
           ("forget_Q_A_ROUGE", "forget ROUGE"), ("retain_Q_A_ROUGE", "retain ROUGE"),
           ("forget_verbmem_ROUGE", "VerbMem"), ("privleak", "PrivLeak"))
# --quick: generations this short are no measure of ROUGE; they keep the smoke test short
QUICK_EVAL = ["--max-new-tokens", "16", "--verbmem-max-new-tokens", "16",
              "--knowmem-max-new-tokens", "8", "--eval-retain-size", "40"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--rates", type=float, nargs="+", default=list(DEFAULT_RATES),
                        help="the fixed-rate baselines' sweep")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--rule", choices=list(RULES), default="fq_keep_mu",
                        help="picks each run's best point and each baseline's rate")
    parser.add_argument("--ranks", type=int, default=2, help="ranks per run")
    parser.add_argument("--deepspeed", default="ds_configs/zero3.json")
    parser.add_argument("--output-dir", default="runs/compare_methods")
    parser.add_argument("--extra-all", default="", help="more unlearn.py flags for every run "
                                                        "(e.g. --model and --data)")
    parser.add_argument("--retain-model", default=None,
                        help="the retain-only reference of forget quality, scored in the first "
                             "run (default: the embedded default's)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: ngdiff_npo and gdiff_kl (NPO's reference and KL's "
                             "frozen copy), 4 steps, evaluated at 2 and 4, one rate (1e-4), "
                             "short generations")
    parser.add_argument("--rerun", action="store_true", help="rerun runs that have a summary")
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.rates, args.steps, args.eval_every = \
            ["ngdiff_npo", "gdiff_kl"], [1e-4], 4, 2
    if args.steps < 1 or args.ranks < 1 or args.eval_every < 0:
        parser.error("--steps and --ranks must be >= 1, --eval-every >= 0")
    if any(not (rate > 0 and math.isfinite(rate)) for rate in args.rates):
        parser.error("--rates must be positive")
    # NGDiff first: its run scores the reference and the starting model for all the others
    args.methods = sorted(dict.fromkeys(args.methods),
                          key=lambda m: (not PRESETS[m].adaptive_lr, list(PRESETS).index(m)))
    return args


def planned_runs(args) -> list[dict]:
    """(method, rate) of every run; rate None: the adaptive rate from the config's."""
    runs = []
    for method in args.methods:
        for rate in ([None] if PRESETS[method].adaptive_lr else args.rates):
            name = method if rate is None else f"{method}_lr{rate:.0e}"
            runs.append({"method": method, "rate": rate, "name": name})
    return runs


def command_of(args, run: dict, out: Path, first: Path | None) -> list[str]:
    flags = ["--deepspeed", args.deepspeed, "--method", run["method"], "--max-steps",
             str(args.steps), "--eval-every", str(args.eval_every), "--output-dir", str(out)]
    if run["rate"] is not None:
        flags += ["--lr", repr(run["rate"])]
    if first is not None:  # the same reference and starting model as the first run's
        flags += ["--retain-results", str(first / "eval" / "retain_model_results.json"),
                  "--no-eval-before"]
    elif args.retain_model:
        flags += ["--retain-model", args.retain_model]
    if args.quick:
        flags += QUICK_EVAL
    return unlearn_command(args.ranks, flags + shlex.split(args.extra_all))


def read_points(out: Path) -> list[dict]:
    """The run's evaluation points in order, each its summary with ``label`` and ``step``."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    points = {}
    for row in rows:
        if row["kind"] == "unlearning_metrics":  # by step, the last row winning (resumes)
            # the run log writes non-finite numbers as "nan" / "inf" / "-inf" strings
            points[row["step"]] = {k: float(v) if v in ("nan", "inf", "-inf") else v
                                   for k, v in row.items()}
    steps = sorted(points)
    last = steps[-1] if steps else None
    return [{**{k: v for k, v in points[s].items() if k not in ("kind", "step", "time")},
             "step": s, "label": "before" if s == 0 else ("final" if s == last else f"step{s}")}
            for s in steps]


def summarise_run(args, run: dict, out: Path, before: dict | None) -> dict:
    if run.get("failed"):
        return {**run, "dir": str(out), "points": [], "final": None, "best": None,
                "score": None, "adaptive_lr": None, "method_as_run": None}
    points = [p for p in read_points(out) if p["label"] != "before"]
    trajectory = ([before] if before else []) + points
    best = best_point(args.rule, trajectory)
    summary = json.loads((out / "summary.json").read_text())
    return {**run, "dir": str(out), "points": trajectory, "final": points[-1] if points else None,
            "best": None if best is None else {"label": best[0]["label"], "score": best[1],
                                               "point": best[0]},
            "score": None if best is None else best[1], "adaptive_lr": summary["adaptive_lr"],
            "method_as_run": summary["method"]}


def pick_rates(records: list[dict]) -> dict[str, str]:
    """method -> the name of its picked run (the best score; none scored: the first run)."""
    picked = {}
    for method in dict.fromkeys(r["method"] for r in records):
        runs = [r for r in records if r["method"] == method]
        scored = [r for r in runs if r["score"] is not None]
        picked[method] = max(scored, key=lambda r: r["score"])["name"] if scored \
            else runs[0]["name"]
    return picked


def _cell(point: dict | None, key: str) -> str:
    if point is None:
        return "-"
    value = model_utility(point) if key == "model_utility" else point.get(key)
    if not isinstance(value, (int, float)):
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2g}" if key == "forget_quality" else f"{value:.3g}"


def table(records: list[dict], picked: dict[str, str], before: dict | None, rule: str) -> str:
    head = ["method", "rate", "point", *(h for _, h in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if before:
        lines.append("| (starting model) | - | before | "
                     + " | ".join(_cell(before, k) for k, _ in COLUMNS) + " |")
    for r in records:
        rate = "adaptive" if r["rate"] is None else f"{r['rate']:.0e}"
        if r.get("failed"):
            lines.append(f"| {r['method']} | {rate} | failed: {r['failed']} |"
                         + " |" * len(COLUMNS))
            continue
        mark = " **(picked)**" if picked[r["method"]] == r["name"] and r["rate"] is not None \
            else ""
        lines.append(f"| {r['method']} | {rate}{mark} | final | "
                     + " | ".join(_cell(r["final"], k) for k, _ in COLUMNS) + " |")
        best = r["best"]
        label = "none" if best is None else best["label"]
        lines.append(f"| {r['method']} | {rate} | best by {rule}: {label} | "
                     + " | ".join(_cell(best and best["point"], k) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def _usable(points: list[dict]) -> list[dict]:
    return [p for p in points if isinstance(p.get("forget_quality"), (int, float))
            and isinstance(model_utility(p), (int, float))
            and math.isfinite(p["forget_quality"]) and math.isfinite(model_utility(p))]


def plot(records: list[dict], picked: dict[str, str], path: Path) -> None:
    """Forget quality (log) against model utility: the whole range, and beside it a zoom on
    the utility the starting model has (where the methods that keep it crowd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (whole, zoom) = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    methods = list(picked)
    colours = plt.cm.tab10([i % 10 for i in range(len(methods))])
    before = next((p for r in records for p in _usable(r["points"]) if p["label"] == "before"),
                  None)
    for axes in (whole, zoom):
        for r in records:
            points = _usable(r["points"])
            if not points:
                continue
            colour = colours[methods.index(r["method"])]
            chosen = picked[r["method"]] == r["name"]
            rate = "adaptive" if r["rate"] is None else f"{r['rate']:.0e}"
            axes.plot([model_utility(p) for p in points],
                      [max(p["forget_quality"], 1e-30) for p in points],
                      "-o" if chosen else ":", color=colour, alpha=1.0 if chosen else 0.3,
                      markersize=4, linewidth=2.0 if r["rate"] is None else 1.2,
                      label=f"{r['method']} ({rate})" if chosen and axes is zoom else None)
            if chosen:
                last = points[-1]
                axes.annotate(r["method"], (model_utility(last), max(last["forget_quality"], 1e-30)),
                              textcoords="offset points", xytext=(4, 2), fontsize=7,
                              color=colour)
        if before is not None:
            axes.plot([model_utility(before)], [before["forget_quality"]], "k*", markersize=10,
                      label="starting model" if axes is zoom else None)
        axes.set_yscale("log")
        axes.set_xlabel("model utility")
    whole.set_ylabel("forget quality (KS p-value, log)")
    whole.set_title("every rate (picked: solid; others dotted)", fontsize=9)
    if before is not None:  # the zoom: utility within 10 % of the start's and above
        kept = [model_utility(p) for r in records for p in _usable(r["points"])]
        start_utility = model_utility(before)
        low, high = 0.9 * start_utility, max(kept) + 0.1 * (max(kept) - 0.9 * start_utility)
        if high > low:  # (a model with no utility at all, as the tiny random one, has no zoom)
            zoom.set_xlim(low, high)
        zoom.axvline(0.95 * start_utility, color="grey", linewidth=0.8, linestyle="--")
        zoom.set_title("zoom: utility >= 90 % of the start's (dashed: 95 %)", fontsize=9)
    figure.suptitle("TOFU trade-off, one trajectory per method at its picked rate "
                    "(up and right is better)", fontsize=10)
    save_plot(figure, zoom, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = planned_runs(args)
    print(f"[compare_methods] {len(runs)} runs of {args.steps} steps on {args.ranks} rank(s), "
          f"evaluated every {args.eval_every} steps, into {out}", flush=True)
    began = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    first, records, ran = None, [], 0
    for index, run in enumerate(runs):
        run_dir = out / run["name"]
        try:
            ran += run_once(command_of(args, run, run_dir, first), run_dir,
                            f"compare_methods {index + 1}/{len(runs)} {run['name']}",
                            threads_per_rank=threads, rerun=args.rerun)
        except SystemExit as failure:
            if first is None:  # the others need its reference and starting-model point
                raise
            # a baseline that diverges at one rate (e.g. NaN: exit 3) is a result, not the
            # end of the comparison
            run["failed"] = f"exit {failure}"
            print(f"[compare_methods] {run['name']} failed: {failure}", flush=True)
            ran += 1
            continue
        if first is None:
            first = run_dir
            if not (first / "eval" / "retain_model_results.json").exists():
                raise SystemExit(f"{first} scored no retain-only reference (the embedded default "
                                 "has one; pass --retain-model with your own --model / --data)")
    before = next((p for p in read_points(first) if p["label"] == "before"), None)
    for run in runs:
        records.append(summarise_run(args, run, out / run["name"], before))
    seconds = time.perf_counter() - began
    picked = pick_rates(records)
    text = "\n".join([
        table(records, picked, before, args.rule), "",
        f"rule: {args.rule} ({RULES[args.rule]}); a baseline's rate is the one whose best "
        "point scores highest under it",
        f"ran {ran} of {len(runs)} runs in {seconds / 60:.1f} min (the others were read from "
        "their directories)"])
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "seconds": seconds, "rule": args.rule, "picked": picked,
         "before": before, "runs": records}, indent=1))
    plot(records, picked, out / "tradeoff.png")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'tradeoff.png'}")


if __name__ == "__main__":
    main()
