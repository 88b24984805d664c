#!/usr/bin/env bash
# The GPU check, for a lent single-GPU machine (H100/H200): prepared here, run there, in
# under 8 minutes. Results (JSON + markdown) go to $OUT (the device tool's folder) or
# runs/gpu_check.
#
# The GPU image has torch and transformers but no deepspeed, hjson, pydantic (nor, perhaps,
# accelerate and peft): bring them as wheels in .whl/ (ignored by git). Once, on the CPU
# machine, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl deepspeed==0.19.8 hjson ninja py-cpuinfo msgpack \
#       accelerate peft
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
#       pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection
#
# then call the device tool with carry [".whl"] and the command `bash benchmarks/gpu_check.sh`.
# It runs, on a ~1.1B Llama (random weights) in bf16, micro-batch 4 x 1024 tokens per task:
#   1. benchmarks/throughput.py without and with activation checkpointing: tokens/s, step
#      breakdown, MFU, peak memory per mode, each beside the plan's prediction
#      (ngdiff_ds/plan.py) for the same run;
#   2. a short main command on the embedded default (bf16 auto-detected), end to end on CUDA;
# and merges the two throughput records into gpu_check.json / gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
DS="python3 -m deepspeed.launcher.runner"
MODEL_1B="--bf16 --hidden-size 2048 --layers 16 --heads 16 --intermediate-size 5632 \
  --vocab-size 32000 --seq-len 1024 --micro-batch-size 4 --steps 6 --warmup 2 --block 3"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$DS --num_gpus 1 benchmarks/throughput.py $MODEL_1B --output-dir "$OUT/throughput"
$DS --num_gpus 1 benchmarks/throughput.py $MODEL_1B --gradient-checkpointing \
  --output-dir "$OUT/throughput_checkpointed"
$DS --num_gpus 1 launch/unlearn.py --deepspeed ds_configs/zero3.json \
  --cache-dir /tmp/ngdiff_cache --output-dir "$OUT/main_command" --max-steps 20 --log-every 10
python3 benchmarks/scaling_report.py "$OUT/throughput/throughput.json" \
  "$OUT/throughput_checkpointed/throughput.json" --output-dir "$OUT/report" || true
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {name: json.loads((out / name / "throughput.json").read_text())
        for name in ("throughput", "throughput_checkpointed")}
summary = json.loads((out / "main_command" / "summary.json").read_text())
(out / "gpu_check.json").write_text(json.dumps({"throughput": runs, "main_command": summary},
                                               indent=1))
lines = ["# GPU check", "", (out / "gpu.txt").read_text().strip(), ""]
for name in runs:
    lines += [f"## {name}", "", (out / name / "throughput.md").read_text(), ""]
lines += ["## main command (embedded default, 20 steps)", "",
          f"before {summary['before']} -> after {summary['after']}"]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print((out / "gpu_check.md").read_text())
PY
