#!/usr/bin/env bash
# Re-create the tables and charts of the README's results for THIS CPU (docs/<cpu>/), in one go.
# Needs this CPU's records (tuning_logs/host-<cpu>/, see scripts/tune_shipped.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
HOST_RECORDS=$(.venv/bin/python -c "from tvmshuffle import targets; print(targets.records_name(targets.resolve('host')))")
RECORDS=tuning_logs/$HOST_RECORDS
OUT=docs/${HOST_RECORDS#host-}
mkdir -p "$OUT"
for model in shufflenet_v1_g3_x1_0 shufflenet_v2_x1_0; do
  .venv/bin/tvmshuffle bench "$model" --threads "$THREADS" --repeat 40 \
    --json "$OUT/bench-$model.json" --plot "$OUT/bench-$model.png" | tee "$OUT/bench-$model.md"
  .venv/bin/tvmshuffle profile "$model" --threads "$THREADS" --tuning-records "$RECORDS/$model" \
    > "$OUT/profile-$model.md"
done
.venv/bin/python scripts/plot_curve.py "$RECORDS"/shufflenet_v1_g3_x1_0{,-unfused} \
  "$RECORDS"/shufflenet_v2_x1_0{,-unfused} -o "$OUT/tuning_curve.png"
