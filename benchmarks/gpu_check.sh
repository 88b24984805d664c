#!/usr/bin/env bash
# Short GPU check for a lent single-GPU machine (H100/H200); prepared here, run there.
#
# The GPU image has torch and transformers but no deepspeed, hjson or pydantic: bring them
# as wheels in .whl/ (ignored by git). Once, on the CPU machine, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl deepspeed==0.19.8 hjson ninja py-cpuinfo msgpack
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
#       pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection
#
# then call the device tool with carry [".whl"] and the command `bash benchmarks/gpu_check.sh`.
# It prints: the bf16 step-overhead benchmark (time ratio NGDiff/floor, adaptive-rate cost,
# peak memory above step start, extra memory in gradient partitions) and a short run of the
# main command on the embedded default in bf16 (auto-detected) to see it end to end on CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
DS="python3 -m deepspeed.launcher.runner"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$DS --num_gpus 1 benchmarks/step_overhead.py --bf16 --hidden-size 1024 --layers 8 \
  --seq-len 512 --micro-batch-size 8 --vocab-size 32000 --steps 16
$DS --num_gpus 1 launch/unlearn.py --deepspeed ds_configs/zero3.json \
  --cache-dir /tmp/ngdiff_cache --output-dir /tmp/ngdiff_gpu_run --max-steps 20 --log-every 10
