#!/usr/bin/env bash
# The issue-6 LIDC protocol on this 2-core CPU machine: every model of the registry trained for 15 wall-clock
# minutes (one thread per process, two processes side by side), plus one 60-minute run of ProSeg `default`;
# fold 0, best checkpoint on validation, test scored on every 5th test slice (all 75 test patients) with
# K=16 in both modes and K=50 in diverse mode, both conventions. Then one table over all rows.
# Usage: benchmarks/lidc_protocol.sh PREPARED_LIDC OUT   (PREPARED_LIDC: proseg prepare ... --rater-order area-ranked)
set -euo pipefail
data=${1:?prepared LIDC store}; out=${2:?output folder}
py=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
source "$(dirname "$0")/model_specs.sh"
long=("proseg-default-60min=proseg:default" "phiseg=phiseg|$phiseg" "prob_unet=prob_unet|$small")
short=("proseg-default=proseg:default" "proseg-reference=proseg:reference" "pionono=pionono|$small"
       "dpersona=dpersona|$small" "cm_global=cm_global|$small" "cm_pixel=cm_pixel|$small")
common=(--dataset lidc --data "$data" --out "$out" --samples 16 50 --personalized-k 16 --test-stride 5
        --max-val-cases 60 --workers 0 --figures 2 --override optim.lr=1e-3 optim.warmup_steps=10
        train.batch_size=16)
mkdir -p "$out"
# Re-running skips finished runs. The 60-minute run goes first on its own driver, so it gets its own core.
"$py" benchmarks/quality.py "${common[@]}" --budget-min 60 --models "${long[0]}" >"$out/driver-a.log" 2>&1 &&
  "$py" benchmarks/quality.py "${common[@]}" --budget-min 15 --models "${long[@]:1}" >>"$out/driver-a.log" 2>&1 &
a=$!
"$py" benchmarks/quality.py "${common[@]}" --budget-min 15 --models "${short[@]}" >"$out/driver-b.log" 2>&1 &
b=$!
status=0
wait $a || status=1
wait $b || status=1
"$py" benchmarks/quality.py "${common[@]}" --budget-min 15 --models "${short[0]}" "${long[0]}" "${short[@]:1}" \
  "${long[@]:1}" --only-tables
exit $status
