#!/usr/bin/env bash
# Run the three notebooks top to bottom, one process after another, from fresh checkpoints, and log
# the wall time of each (executed copies, with per-cell timings, go to outputs/).
#
#   DATASET=path/to/cifar10-jpeg.tar.gz bash benchmarks/notebooks_wall_time.sh [NOTEBOOK ...]
#
# Settings come from the environment as in the notebooks; the CPU or GPU defaults apply otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
# the notebooks train their models afresh, the independent classifier too (other datasets' stay); MPLBACKEND is
# left to the kernel, whose inline backend puts the figures into the executed copies
export RETRAIN=1
case "$(echo "${SMOKE:-}" | tr '[:upper:]' '[:lower:]' | xargs)" in  # as training.setting reads it
  ""|0|false|no|off) smoke="" ;;
  *) smoke=smoke/ ;;  # a smoke run's checkpoints and executed copies, apart from a full run's
esac
PY=${PY:-.venv/bin/python}
device=$($PY -c 'import training; print(training.get_device())') ||
  { echo "$PY cannot import the project: give PY=" >&2; exit 1; }
out=outputs/${smoke}
log=${out}notebooks_wall_time.log  # a smoke run's times apart from a full run's
mkdir -p "$out"
echo "$(date -u +%FT%TZ) ${smoke:+SMOKE }DATASET=${DATASET:-cifar10} on $device, $(nproc) cores" | tee -a "$log"
total=0
notebooks=("$@")  # default: all three, in order
[ ${#notebooks[@]} -gt 0 ] || notebooks=(Classifier.ipynb VAE.ipynb Visualization.ipynb)
trap 'echo "${nb:-setup}: FAILED (see the error above); no total" | tee -a "$log"' ERR
for nb in "${notebooks[@]}"; do
  start=$(date +%s)
  rm -f "$out/$nb"  # a failed run leaves no earlier run's executed copy behind to be read as this one
  $PY -m jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 --output-dir "$out" "$nb"
  took=$(( $(date +%s) - start )); total=$(( total + took ))
  echo "$nb: ${took} s" | tee -a "$log"
done
echo "${notebooks[*]}: ${total} s ($(( total / 60 )) min $(( total % 60 )) s)" | tee -a "$log"
