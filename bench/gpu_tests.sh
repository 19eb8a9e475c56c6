#!/usr/bin/env bash
# The CPU test files that exercise CUDA code paths when a GPU is present (CUDA graphs in predict,
# the decoder's caches, the training step, adamw_bf16's Triton kernel, the batched loss with sam3's
# Triton focal loss), run on the lent GPU with
# .whl/ (wheels the GPU image lacks, open_clip_torch among them), .gpu/ and data/ carried:
#   bash bench/gpu_tests.sh
set -euo pipefail
source bench/gpu_env.sh
export PYTHONPATH="$PYTHONPATH:$PWD/tests"
python3 -m pytest -q -p no:cacheprovider --tb=short -W ignore tests/test_predict.py tests/test_model.py tests/test_trainer_step.py tests/test_adamw_kernel.py tests/test_loss.py tests/test_bf16_weights.py "$@"
