#!/usr/bin/env bash
# Re-create the shipped host records in tuning_logs/host/ (fused: what `compile --tuning-records`
# uses; unfused: the comparison in scripts/bench_fusion.py and `tvmshuffle bench`).
# Same budget for both, so that fused vs unfused compares like with like. Resumes if interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${TRIALS:-800}
BATCH=${BATCH:-32}
for model in shufflenet_v1_g3_x1_0 shufflenet_v2_x1_0; do
  for fuse in "" "--no-fuse"; do
    .venv/bin/tvmshuffle tune "$model" --target host --trials "$TRIALS" --trials-per-batch "$BATCH" $fuse
  done
done
