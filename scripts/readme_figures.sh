#!/usr/bin/env bash
# Re-create every table and chart the README shows (docs/), on this machine, in one go.
# Needs the shipped host records (tuning_logs/host/, see scripts/tune_shipped.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
mkdir -p docs
for model in shufflenet_v1_g3_x1_0 shufflenet_v2_x1_0; do
  .venv/bin/tvmshuffle bench "$model" --threads "$THREADS" --repeat 30 \
    --json "docs/bench-$model.json" --plot "docs/bench-$model.png" | tee "docs/bench-$model.md"
  TVM_NUM_THREADS=$THREADS .venv/bin/tvmshuffle profile "$model" --schedules none \
    --tuning-records "tuning_logs/host/$model" > "docs/profile-$model.md"
  TVM_NUM_THREADS=$THREADS .venv/bin/tvmshuffle profile "$model" \
    --tuning-records "tuning_logs/host/$model" > "docs/profile-$model-hand.md"
done
# every distinct fused layer of the zoo's V1 and V2: default / hand / tuned, roofline
TVM_NUM_THREADS=$THREADS .venv/bin/tvmshuffle study -o docs/study
TVM_NUM_THREADS=$THREADS .venv/bin/python scripts/bench_fusion.py --tuned --runs 30 --threads "$THREADS" \
  --json docs/bench_fusion_tuned.json
.venv/bin/python scripts/plot_curve.py tuning_logs/host/shufflenet_v1_g3_x1_0{,-unfused} \
  tuning_logs/host/shufflenet_v2_x1_0{,-unfused} -o docs/tuning_curve.png
