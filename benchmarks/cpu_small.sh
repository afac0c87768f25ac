#!/usr/bin/env bash
# The first CPU-scale benchmark pass (docs/results/pass1-cpu-small.md): every model on one small U-Net scale (widths 16-32-64-128),
# ProSeg's reference architecture beside it, equal wall-clock budgets, one thread per process.
# Usage: benchmarks/cpu_small.sh DATA_ROOT OUT_ROOT   (DATA_ROOT holds the prepared lidc/ and qubiq/ stores)
set -euo pipefail
data=${1:?prepared data root}; out=${2:?output root}
py=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
source "$(dirname "$0")/model_specs.sh"
models=(
  "proseg-default=proseg:default"
  "proseg-small=proseg:default|$small|model.args.rater_sampling=one"
  "proseg-small+all=proseg:default|$small|model.args.rater_sampling=all"
  "proseg-reference=proseg:reference"
  "prob_unet=prob_unet|$small"
  "phiseg=phiseg|$phiseg"
  "pionono=pionono|$small"
  "dpersona=dpersona|$small"
  "cm_global=cm_global|$small"
  "cm_pixel=cm_pixel|$small"
  "proseg-small+logvar-4=proseg:default|$small|model.args.rater_sampling=one|model.args.z_logvar_init=-4"
  "proseg-default+logvar-4=proseg:default|model.args.z_logvar_init=-4"
)
common=(--samples 16 --workers 0 --figures 2 --override optim.lr=1e-3 optim.warmup_steps=10)
# Re-running skips finished runs; add --only-tables (as a 4th argument) to rebuild results.md from what exists.
extra=("${@:4}")
case "${3:-both}" in
  qubiq|both) "$py" benchmarks/quality.py --dataset qubiq --data "$data/qubiq" --out "$out/qubiq" --budget-min 2 \
      "${common[@]}" train.val_every=5 train.batch_size=8 --models "${models[@]}" "${extra[@]}" ;;&
  lidc|both) "$py" benchmarks/quality.py --dataset lidc --data "$data/lidc" --out "$out/lidc" --budget-min 5 \
      --max-test-cases 300 --max-val-cases 60 "${common[@]}" train.batch_size=16 \
      --models "${models[1]}" "${models[3]}" "${models[4]}" "${models[6]}" "${models[7]}" "${models[8]}" "${models[10]}" \
      "${extra[@]}" ;;
esac
