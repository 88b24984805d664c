"""NGDiff unlearning on DeepSpeed ZeRO-3.

Run (embedded default: synthetic TOFU-style benchmark + tiny Llama, built on first use):

    deepspeed launch/unlearn.py --deepspeed ds_configs/zero3.json

On CPU only (no GPU):

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/unlearn.py --deepspeed ds_configs/zero3.json

A cluster batch job that survives preemption (the same command for the first run and every
requeue; exit code 75 after SIGTERM/SIGUSR1 with a checkpoint written):

    deepspeed launch/unlearn.py --deepspeed ds_configs/zero3.json --save-every 20 --resume auto

Your own model and TOFU-schema data:

    deepspeed --num_gpus 8 launch/unlearn.py --deepspeed ds_configs/zero3_bf16.json \\
        --model /models/llama-7b-tofu --data /data/tofu --forget-split forget10 \\
        --retain-split retain90 --max-steps 100 --output-dir runs/llama7b-forget10

A method by name (NPO, SimNPO, GDiff with KL... at a fixed rate; see README "Methods"), keeping
the best evaluation point's model as model_best/:

    deepspeed launch/unlearn.py --deepspeed ds_configs/zero3.json --method npo_gdiff --lr 1e-4 \
        --eval-every 10 --select-best fq_mu

A method of your own (a registered loss or combine rule, see docs/design.md):

    deepspeed launch/unlearn.py --deepspeed ds_configs/zero3.json --plugin my_losses.py \\
        --forget-loss my_loss --forget-loss-option beta=0.2

Writes to --output-dir: metrics.jsonl, tensorboard/, summary.json, model/ (an HF directory),
model_best/ with --select-best, and eval/ (TOFU and MUSE results and summaries per evaluation
point, the trade-off plot).
Exit codes: 0 done, 2 bad input (one line names it), 3 the gradients stayed zero or NaN,
75 preempted (checkpoint written: requeue with --resume auto).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ngdiff_ds.adaptive_lr import AdaptiveLRConfig  # noqa: E402
from ngdiff_ds.checkpoint import CheckpointSettings  # noqa: E402
from ngdiff_ds.cli import build_parser  # noqa: E402
from ngdiff_ds.errors import exit_on_bad_input, exit_past_teardown  # noqa: E402
from ngdiff_ds.eval.suite import EvalSettings  # noqa: E402
from ngdiff_ds.job import JobSettings  # noqa: E402
from ngdiff_ds.memory import MemorySettings  # noqa: E402
from ngdiff_ds.settings import from_args  # noqa: E402
from ngdiff_ds.unlearn import UnlearnSettings, unlearn  # noqa: E402


def main() -> None:
    parser = build_parser(__doc__, (JobSettings, None), (UnlearnSettings, "unlearning"),
                          (AdaptiveLRConfig, "adaptive learning rate (GeN parabola fit, rise budget; on by default)"),
                          (EvalSettings, "TOFU and MUSE evaluation"),
                          (CheckpointSettings, "checkpoints and resume"),
                          (MemorySettings, "memory levers"))
    args = parser.parse_args()
    with exit_on_bad_input():
        settings = from_args(UnlearnSettings, args)
        rate = from_args(AdaptiveLRConfig, args, total_steps=settings.max_steps)
        unlearn(from_args(JobSettings, args), settings, rate, from_args(EvalSettings, args),
                from_args(CheckpointSettings, args), from_args(MemorySettings, args))
    exit_past_teardown(0)  # past interpreter teardown, where gloo's threads can abort the process


if __name__ == "__main__":
    main()
