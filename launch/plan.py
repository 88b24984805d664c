"""The plan: per-GPU memory by part, per-step communication, and whether it fits, for NGDiff,
NGDiff with the adaptive rate's probes, NGDiff with one shared forward, and GDiff, before a GPU
hour is spent. Plain python, no GPU, no DeepSpeed launch:

    python launch/plan.py --preset llama2-7b --gpus-per-node 8 --nodes 1 2 4 --gpu-memory 80
    python launch/plan.py --preset llama2-70b --nodes 1 2 4 8 --gradient-checkpointing --markdown
    python launch/plan.py --config /models/llama-7b-tofu --lora --lora-rank 16 --gpu-memory 40 \\
        --gpus-per-node 1 --nodes 1 --json

Presets: llama2-7b, llama2-13b, llama2-70b, llama3-8b, llama3-70b (their public dimensions).
--json prints one JSON object: every configuration (mode x node count) with its parts in
bytes and a boolean "fits", and the smallest node count that fits per mode. What is counted
and what is assumed of DeepSpeed: ngdiff_ds/plan.py. Bad input exits 2 with one line.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ngdiff_ds.cli import build_parser  # noqa: E402
from ngdiff_ds.errors import exit_on_bad_input  # noqa: E402
from ngdiff_ds.plan import PlanSettings, format_plan, make_plan  # noqa: E402
from ngdiff_ds.settings import from_args  # noqa: E402


def main() -> None:
    parser = build_parser(__doc__, (PlanSettings, "the model, the cluster and the run"))
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object")
    output.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args()
    with exit_on_bad_input():
        plan = make_plan(from_args(PlanSettings, args))
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan, markdown=args.markdown))


if __name__ == "__main__":
    main()
