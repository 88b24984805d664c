"""TOFU and MUSE metrics of a saved model, sharded over the ranks of a ZeRO-3 engine.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/evaluate.py --deepspeed ds_configs/zero3.json \\
        --model runs/ngdiff/model --data ~/.cache/ngdiff_ds/default-v4/data \\
        --retain-model ~/.cache/ngdiff_ds/default-v4/model_retain90 --output-dir runs/eval

    deepspeed --num_gpus 8 launch/evaluate.py --deepspeed ds_configs/zero3_bf16.json \\
        --model runs/7b-f10/model --data /data/tofu --retain-results saves/eval/tofu_retain90

Writes <output-dir>/model_results.json (per example), model_summary.json and, under
<output-dir>/model/, open-unlearning's TOFU_EVAL.json / TOFU_SUMMARY.json / MUSE_EVAL.json /
MUSE_SUMMARY.json, and prints the table (with the reference model's column when given).
--retain-results takes our <tag>_results.json, open-unlearning's TOFU_EVAL.json or
MUSE_EVAL.json, or a directory holding them.
The models are inference-only ZeRO-3 engines: sharded weights, no optimizer state.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ngdiff_ds.cli import build_parser  # noqa: E402
from ngdiff_ds.errors import exit_on_bad_input, exit_past_teardown  # noqa: E402
from ngdiff_ds.eval.run_eval import EvaluateSettings, evaluate_saved_model  # noqa: E402
from ngdiff_ds.eval.suite import EvalSettings  # noqa: E402
from ngdiff_ds.job import JobSettings  # noqa: E402
from ngdiff_ds.settings import from_args  # noqa: E402


def main() -> None:
    parser = build_parser(__doc__, (JobSettings, None), (EvaluateSettings, "what to evaluate"),
                          (EvalSettings, "TOFU and MUSE evaluation"))
    args = parser.parse_args()
    with exit_on_bad_input():
        evaluate_saved_model(from_args(JobSettings, args), from_args(EvaluateSettings, args),
                             from_args(EvalSettings, args))
    exit_past_teardown(0)  # past interpreter teardown, where gloo's threads can abort the process


if __name__ == "__main__":
    main()
