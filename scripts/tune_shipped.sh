#!/usr/bin/env bash
# Re-create the shipped host records of THIS CPU in tuning_logs/host-<cpu>/ (fused: what `compile
# --tuning-records` and `bench`'s tvm-tuned-fused use; unfused: bench's tvm-tuned-unfused).
# Same budget for both, so that fused vs unfused compares like with like; every core measured
# (--threads), the design space seeded with the hand schedules, candidates timed cold (the
# defaults). Each CPU has a dir of its own (tvmshuffle.targets.records_name).
# Resumes if interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${TRIALS:-400}
BATCH=${BATCH:-32}
THREADS=${THREADS:-$(nproc)}
for model in shufflenet_v1_g3_x1_0 shufflenet_v2_x1_0; do
  for fuse in "" "--no-fuse"; do
    .venv/bin/tvmshuffle tune "$model" --target host --trials "$TRIALS" --trials-per-batch "$BATCH" \
      --threads "$THREADS" $fuse
  done
done
