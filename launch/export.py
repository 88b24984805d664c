"""Export a checkpoint of a run as a standard HF model directory (safetensors + config +
tokenizer), offline, in one plain process on CPU: no deepspeed launcher, no GPU, any machine.

    python launch/export.py runs/ngdiff/checkpoints runs/ngdiff/exported
    python launch/export.py runs/ngdiff/checkpoints/step000020 runs/step20 --dtype bfloat16

CHECKPOINT is a checkpoints directory (its `latest` checkpoint is exported) or one of its step
directories; an incomplete checkpoint is refused. The weights are consolidated by DeepSpeed's
zero_to_fp32 from every rank's fp32 master and cast to the dtype the run's own export writes
(--dtype overrides it), so the run's final checkpoint exports to exactly its <output-dir>/model.
OUT_DIR is written whole or not at all; an existing HF directory there is replaced.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ngdiff_ds.errors import exit_on_bad_input  # noqa: E402
from ngdiff_ds.export import DTYPES, export_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a checkpoints directory (meaning its latest) or a step directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the HF model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights dtype (default: the run's, from the checkpoint's config)")
    args = parser.parse_args()
    with exit_on_bad_input():
        export_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype)


if __name__ == "__main__":
    main()
