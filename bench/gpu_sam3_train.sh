#!/usr/bin/env bash
# The `sam3` preset (full SAM3: 840 M params, 1008 px, random init, bf16 autocast, AdamW on every
# parameter) trained through the train stage's own code on a GPU: one epoch of the bundled sample
# (24 steps at batch 1) plus validation. Logs loss per step, step time and peak GPU memory.
#
# Prepare here (no GPU needed):  see bench/gpu_sam3_train.md ("How it was run").
# Run on the GPU machine with .whl/ (wheels the GPU image lacks) and .gpu/ (params + fetch and
# prepare outputs for the sam3 preset) carried:   bash bench/gpu_sam3_train.sh [PARAMS]
# (PARAMS: .gpu/params.yaml unless given, e.g. .gpu/params-c.yaml for lean with compile_model)
set -euo pipefail
source bench/gpu_env.sh
PARAMS=${1:-.gpu/params.yaml}
start=$(date +%s)
python3 -m sam3ft.stages.train --params "$PARAMS" 2>&1 | tee "$OUT/train.log" | grep -v "it/s\]" || true
echo "stage_wall_s=$(( $(date +%s) - start ))" | tee -a "$OUT/device.txt"
cp .gpu/scratch/train/telemetry/plots/metrics/train/*.tsv "$OUT/"
cp .gpu/train/dvclive-steps/plots/metrics/step/loss.tsv "$OUT/step_loss.tsv"
cp .gpu/train/dvclive/metrics.json "$OUT/epoch_metrics.json"
ls -la .gpu/train
