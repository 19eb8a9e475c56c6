#!/usr/bin/env bash
# On the GPU machine with .whl/ (wheels the GPU image lacks) and .gpu/ (params + fetched base and
# prepared sample for the sam3 preset, see bench/gpu_sam3_train.md) carried:
#   bash bench/gpu_recipes.sh stock:1:50 lean:1:50 stock:4 ...
set -euo pipefail
source bench/gpu_env.sh
python3 bench/gpu_recipes.py --params .gpu/sam3-1.yaml --profile 3 --out "$OUT/recipes.jsonl" "$@"
