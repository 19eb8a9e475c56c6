#!/usr/bin/env bash
# bench/cpu_repro.py under each kernel setting, one row each, on this machine's CPU (CUDA hidden).
# Here: `bash bench/cpu_repro.sh OUT.jsonl`. On the GPU host, with .whl/ (see
# bench/gpu_sam3_train.md) and data/ carried: `bash bench/cpu_repro.sh $OUT/cpu_repro.jsonl whl`.
set -euo pipefail
OUT_FILE=${1:?usage: cpu_repro.sh OUT.jsonl [whl]}
PY=${PYTHON:-python3}
if [ "${2:-}" = whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export CUDA_VISIBLE_DEVICES=""
AVX2="--env ATEN_CPU_CAPABILITY=avx2 --env MKL_CBWR=AVX2 --env DNNL_MAX_CPU_ISA=AVX2"
COMPAT="--env ATEN_CPU_CAPABILITY=avx2 --env MKL_CBWR=COMPATIBLE --env DNNL_MAX_CPU_ISA=AVX2"
BASELINE="--env ATEN_CPU_CAPABILITY=default --env MKL_CBWR=COMPATIBLE --env DNNL_MAX_CPU_ISA=SSE41"
$PY bench/cpu_repro.py --label native --out "$OUT_FILE"
$PY bench/cpu_repro.py --label avx2 --out "$OUT_FILE" $AVX2
$PY bench/cpu_repro.py --label compat --out "$OUT_FILE" $COMPAT
$PY bench/cpu_repro.py --label baseline --out "$OUT_FILE" $BASELINE
