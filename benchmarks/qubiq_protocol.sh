#!/usr/bin/env bash
# The issue-6 QUBIQ protocol on this 2-core CPU machine: every model of the registry trained for 5 wall-clock
# minutes (one thread per process), fold 0 (26 / 3 / 10 cases), best checkpoint on validation, all 10 test cases
# scored with K=16 in both modes and K=50 in diverse mode, both conventions, 7 raters in stored (real) identity.
# Usage: benchmarks/qubiq_protocol.sh PREPARED_QUBIQ OUT [both|a|b|tables]
#   both (default): the two halves side by side, then one table; a / b: one half (to chain behind other work);
#   tables: rebuild results.md from what exists.
set -euo pipefail
data=${1:?prepared QUBIQ store}; out=${2:?output folder}; what=${3:-both}
py=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
source "$(dirname "$0")/model_specs.sh"
half_a=("proseg-default=proseg:default" "prob_unet=prob_unet|$small" "pionono=pionono|$small"
        "cm_global=cm_global|$small")
half_b=("proseg-reference=proseg:reference" "phiseg=phiseg|$phiseg" "dpersona=dpersona|$small"
        "cm_pixel=cm_pixel|$small")
common=(--dataset qubiq --data "$data" --out "$out" --budget-min 5 --samples 16 50 --personalized-k 16
        --workers 0 --figures 2 --override optim.lr=1e-3 optim.warmup_steps=10 train.batch_size=8 train.val_every=5)
mkdir -p "$out"
all=("${half_a[0]}" "${half_b[0]}" "${half_a[@]:1:1}" "${half_b[@]:1:1}" "${half_a[@]:2:1}" "${half_b[@]:2:1}"
     "${half_a[@]:3:1}" "${half_b[@]:3:1}")
case "$what" in
  a) "$py" benchmarks/quality.py "${common[@]}" --models "${half_a[@]}" >"$out/driver-a.log" 2>&1 ;;
  b) "$py" benchmarks/quality.py "${common[@]}" --models "${half_b[@]}" >"$out/driver-b.log" 2>&1 ;;
  both)
    "$py" benchmarks/quality.py "${common[@]}" --models "${half_a[@]}" >"$out/driver-a.log" 2>&1 & a=$!
    "$py" benchmarks/quality.py "${common[@]}" --models "${half_b[@]}" >"$out/driver-b.log" 2>&1 & b=$!
    status=0; wait $a || status=1; wait $b || status=1
    "$py" benchmarks/quality.py "${common[@]}" --models "${all[@]}" --only-tables
    exit $status ;;
  tables) "$py" benchmarks/quality.py "${common[@]}" --models "${all[@]}" --only-tables ;;
  *) echo "unknown part $what (both, a, b or tables)" >&2; exit 2 ;;
esac
