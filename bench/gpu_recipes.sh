#!/usr/bin/env bash
# On the GPU machine with .whl/ (wheels the GPU image lacks) and .gpu/ (params + fetched base and
# prepared sample for the sam3 preset, see bench/gpu_sam3_train.md) carried:
#   bash bench/gpu_recipes.sh stock:1:50 lean:1:50 stock:4 ...
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/device.txt"
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])" | tee -a "$OUT/device.txt"
date -u +%FT%TZ | tee -a "$OUT/device.txt"
python3 bench/gpu_recipes.py --params .gpu/sam3-1.yaml --profile 3 --out "$OUT/recipes.jsonl" "$@"
