"""Guard for behaviour-preserving changes: run the main command on a fixed seed, and compare
two such runs row for row and weight for weight.

    # record a run (2 ranks, 6 steps, evaluation at steps 0, 3 and 6) from a checkout
    python tools/same_run.py run runs/guard-before
    # ... change the code ...
    python tools/same_run.py run runs/guard-after
    python tools/same_run.py compare runs/guard-before runs/guard-after

``compare`` exits 0 when every ``metrics.jsonl`` row is identical (timings aside), every
evaluation file (per-example results and summaries) and ``summary.json`` are identical, and the exported weights are equal
bit for bit; otherwise it prints the first differences and exits 1. A change that alters the
numbers on purpose says so in its commit message instead of passing this guard.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMING_KEYS = {"step_time", "tokens_per_s", "probe_time"}
RUN_ARGS = ["--max-steps", "6", "--eval-every", "3", "--seed", "0", "--log-every", "1"]


def run(out_dir: Path, cache_dir: str | None, ranks: int) -> None:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    command = [deepspeed, "--num_gpus", str(ranks), "--master_port", "29731",
               str(REPO / "launch" / "unlearn.py"), "--deepspeed", str(REPO / "ds_configs" / "zero3.json"),
               "--output-dir", str(out_dir), *RUN_ARGS]
    if cache_dir:
        command += ["--cache-dir", cache_dir]
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    sys.exit(subprocess.call(command, cwd=REPO, env=env))


def _rows(out_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def _weights(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "model" / "model.safetensors"))


def compare(before: Path, after: Path) -> int:
    import torch

    problems = []
    rows_before, rows_after = _rows(before), _rows(after)
    if len(rows_before) != len(rows_after):
        problems.append(f"metrics.jsonl: {len(rows_before)} rows vs {len(rows_after)}")
    for i, (a, b) in enumerate(zip(rows_before, rows_after)):
        if a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            problems.append(f"metrics.jsonl row {i} ({a.get('kind')} step {a.get('step')}): "
                            + ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:4]))
    for name in sorted(p.name for p in (before / "eval").glob("*.json")):
        a = json.loads((before / "eval" / name).read_text())
        other = after / "eval" / name
        if not other.is_file() or a != json.loads(other.read_text()):
            problems.append(f"eval/{name} differs or is missing")
    summary_before = json.loads((before / "summary.json").read_text())
    summary_after = json.loads((after / "summary.json").read_text())
    for key in sorted(set(summary_before) | set(summary_after)):
        if summary_before.get(key) != summary_after.get(key):
            problems.append(f"summary.json {key}: {summary_before.get(key)!r} vs {summary_after.get(key)!r}")
    weights_before, weights_after = _weights(before), _weights(after)
    if set(weights_before) != set(weights_after):
        problems.append("model: different tensor names")
    for name in sorted(set(weights_before) & set(weights_after)):
        if not torch.equal(weights_before[name], weights_after[name]):
            problems.append(f"model: {name} differs")
    for problem in problems[:20]:
        print(problem)
    print(f"{len(rows_before)} rows, {len(weights_before)} tensors compared: "
          + ("identical" if not problems else f"{len(problems)} difference(s)"))
    return 1 if problems else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the guard command into OUT_DIR")
    run_parser.add_argument("out_dir", type=Path)
    run_parser.add_argument("--cache-dir", default=None)
    run_parser.add_argument("--ranks", type=int, default=2)
    compare_parser = commands.add_parser("compare", help="compare two recorded runs")
    compare_parser.add_argument("before", type=Path)
    compare_parser.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args.out_dir, args.cache_dir, args.ranks)
    else:
        sys.exit(compare(args.before, args.after))


if __name__ == "__main__":
    main()
