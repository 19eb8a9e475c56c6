#!/usr/bin/env bash
# On a machine with 2+ GPUs, with .whl/ and .gpu/ carried (bench/gpu_sam3_train.md, "How it was run"):
#   bash bench/gpu_scaling_compiled.sh --gpus 1 2        (4/8 GPUs: --gpus 1 2 4 8)
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/device.txt"
date -u +%FT%TZ | tee -a "$OUT/device.txt"
python3 bench/gpu_scaling_compiled.py --params .gpu/sam3-1.yaml "$@" > "$OUT/scaling_compiled.json"
cat "$OUT/scaling_compiled.json"
