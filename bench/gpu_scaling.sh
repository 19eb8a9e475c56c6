#!/usr/bin/env bash
# On the 2-GPU machine, with .whl/ and .gpu/ carried: bash bench/gpu_scaling.sh
set -euo pipefail
source bench/gpu_env.sh
python3 bench/gpu_scaling.py "$@" > "$OUT/scaling.json"
cat "$OUT/scaling.json"
