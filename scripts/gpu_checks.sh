#!/usr/bin/env bash
# The kernel checks and timings a GPU session should run first, in one device call of under 10
# minutes (each part has its own time budget; a failing part is reported and the next runs):
#
#   1. benchmarks/gpu_attention.py, decode windows: every window kernel (pallas, mosaic, xla,
#      cudnn; triton too when jax-triton imports) checked against the reference on a poisoned
#      ragged cache (and the training-mask kernels, mosaic's included, against theirs),
#      then timed over 1k-32k caches at batch 1 and 8;
#   2. benchmarks/gpu_decode_sweep.py --sections baseline --device-time: the issue's decode
#      shapes (32 x 8, 8 x 8, 32 x 1 over 16k keys), host and device time, Pallas beside the
#      Mosaic GPU kernel at 2 and 3 stages (and with P V from shared memory);
#   3. benchmarks/gpu_attention.py, training mask: pallas and mosaic (forward and backward on
#      wgmma; and its forward with pallas' backward) against cudnn at 8k and 2k tokens
#      (forward and forward + backward).
#
#   bash scripts/gpu_checks.sh OUT_DIR             # on a GPU
#   SMOKE=1 bash scripts/gpu_checks.sh OUT_DIR     # on CPU: tiny shapes, the scripts' own check
#
# Writes OUT_DIR/{decode,decode_sweep,train}.jsonl and .log; the exit status is 1 when a
# correctness check failed or a part crashed.
set -uo pipefail
OUT=$(realpath -m "${1:?usage: bash scripts/gpu_checks.sh OUT_DIR}")  # before the cd
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
status=0

part() {  # part NAME SCRIPT ARGS...: runs one benchmark, keeps its JSON lines and its output
  local name=$1 script=$2
  shift 2
  local smoke=()
  [[ -n "${SMOKE:-}" ]] && smoke=(--cpu-smoke)
  echo "== $name: $script $* ${smoke[*]}"
  if ! "$PYTHON" "benchmarks/$script" "$@" "${smoke[@]}" --out "$OUT/$name.jsonl" \
      > "$OUT/$name.log" 2>&1; then
    echo "   FAILED (see $OUT/$name.log)"
    status=1
  fi
  sed -n '/summary/,$p' "$OUT/$name.log" | head -60
}

if [[ -n "${SMOKE:-}" ]]; then
  sweep_shapes=8x2
else
  sweep_shapes=32x8,8x8,32x1
fi
part decode gpu_attention.py --sections ceilings,check,decode --quick \
  --impls pallas,triton,mosaic,xla,cudnn --time-budget 170
part decode_sweep gpu_decode_sweep.py --sections baseline --device-time \
  --shapes "$sweep_shapes" --time-budget 150
part train gpu_attention.py --sections ceilings,train --quick --impls pallas,mosaic,cudnn \
  --time-budget 120
exit $status
