#!/usr/bin/env bash
# On the 2-GPU machine, with .whl/ and .gpu/ carried: bash bench/gpu_scaling.sh
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/device.txt"
python3 bench/gpu_scaling.py "$@" > "$OUT/scaling.json"
cat "$OUT/scaling.json"
