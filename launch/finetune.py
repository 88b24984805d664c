"""Plain fine-tuning through ZeRO-3 on TOFU-schema QA splits (loss on the answers) and text
splits (loss on every token), trained on together.

This is how the embedded default's models are made; use it to fine-tune your own model on
your own data before unlearning:

    deepspeed launch/finetune.py --deepspeed ds_configs/zero3.json \\
        --model /models/base --data /data/tofu --splits full --steps 500 --output-dir runs/ft

CPU only:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py --deepspeed ds_configs/zero3.json \\
        --model MODEL_DIR --data DATA_DIR --splits full world_facts --steps 200

Writes <output-dir>/model (an HF directory), metrics.jsonl and tensorboard/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ngdiff_ds.cli import build_parser  # noqa: E402
from ngdiff_ds.errors import exit_on_bad_input, exit_past_teardown  # noqa: E402
from ngdiff_ds.finetune import FinetuneSettings, finetune  # noqa: E402
from ngdiff_ds.job import JobSettings  # noqa: E402
from ngdiff_ds.memory import MemorySettings  # noqa: E402
from ngdiff_ds.settings import from_args  # noqa: E402


def main() -> None:
    parser = build_parser(__doc__, (JobSettings, None), (FinetuneSettings, "fine-tuning"),
                          (MemorySettings, "memory levers"))
    args = parser.parse_args()
    with exit_on_bad_input():
        finetune(from_args(JobSettings, args), from_args(FinetuneSettings, args),
                 from_args(MemorySettings, args))
    exit_past_teardown(0)  # past interpreter teardown, where gloo's threads can abort the process


if __name__ == "__main__":
    main()
