#!/usr/bin/env bash
# On a machine with 2+ GPUs, with .whl/ and .gpu/ carried (bench/gpu_sam3_train.md, "How it was run"):
#   bash bench/gpu_scaling_compiled.sh --gpus 1 2        (4/8 GPUs: --gpus 1 2 4 8)
set -euo pipefail
source bench/gpu_env.sh
python3 bench/gpu_scaling_compiled.py --params .gpu/sam3-1.yaml "$@" > "$OUT/scaling_compiled.json"
cat "$OUT/scaling_compiled.json"
