#!/usr/bin/env bash
# `sam3ft serve` on one GPU, sam3 preset (seeded random init, mask head, bf16 export): the load test
# of bench/serve_load.py with the server unbatched and batched (up to 8 images per model call), one
# after another in one call; each request thresholded so that its reply carries 10 detections with
# masks.
# On the GPU machine, repository root, .whl/ carried (litserve, fastapi, uvicorn, pydantic and the
# rest of the serve stack among the wheels; bench/gpu_sam3_train.md says how .whl/ is made):
#   bash bench/gpu_serve.sh   (WHL=DIR: the wheels elsewhere than .whl/)
set -euo pipefail
source bench/gpu_env.sh
python3 bench/serve_load.py --preset sam3 --device cuda --dets 10 --requests 48 \
  --setting unbatched="--max-batch-size 1" \
  --setting batched="--max-batch-size 8" \
  --out "$OUT/serve_load"
