#!/usr/bin/env bash
# Issue 14, one H200 call (< 8 min): tune the tc kernel (compress/kernels/tc.py) for the M
# buckets 16..256 (INT4 and NVFP4; the other formats use the "*" fallback = INT4's), then time
# every format at M = 16..256 against cuBLAS bf16 and tinygemm with the tuned table, the routed
# path and the tc kernel forced (<variant>@tc: at M = 16 the table routes to decode).
#   OUT=/tmp/o bash kernels/h200_tc.sh                      # on the GPU
#   OUT=/tmp/o TRITON_INTERPRET=1 bash kernels/h200_tc.sh --dry-run   # CPU: the harness only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a directory}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python}
BUDGET=${BUDGET:-150}      # autotune seconds; BENCH_S: bench_kernels time limit (300)
DRY=0
for a in "$@"; do case $a in --dry-run) DRY=1;; esac; done
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/tc_sweep.log"; }
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv >"$OUT/gpu.txt" 2>&1 || true
CFG="$OUT/nvidia_h200.json"
VARIANTS=bf16,tinygemm,int4-g128,int4-g128-asym,int8-channel,nvfp4,mxfp4
VARIANTS=$VARIANTS,int4-g128@tc,int4-g128-asym@tc,int8-channel@tc,nvfp4@tc,mxfp4@tc

stamp "autotune --path tc"
if [ $DRY = 1 ]; then
  $PY kernels/autotune.py --dry-run --path tc --formats int4 --buckets 16,64 --budget-s 0 \
      --base compress/kernels/configs/nvidia_h200.json --out "$CFG" \
      --log "$OUT/autotune_tc.jsonl" >"$OUT/autotune_tc.txt" 2>&1
else
  timeout $(( BUDGET + 90 )) $PY kernels/autotune.py --path tc --formats int4,nvfp4 \
      --buckets 16,64,128,256 --budget-s "$BUDGET" --reps 10 \
      --base compress/kernels/configs/nvidia_h200.json --out "$CFG" \
      --log "$OUT/autotune_tc.jsonl" >"$OUT/autotune_tc.txt" 2>&1
fi
stamp "autotune rc=$?"
if [ -s "$CFG" ]; then export COMPRESS_KERNEL_CONFIGS="$CFG"; else stamp "no tuned table: shipped configs"; fi
tail -12 "$OUT/autotune_tc.txt"

stamp "bench_kernels"
if [ $DRY = 1 ]; then
  $PY kernels/bench_kernels.py --dry-run --variants "$VARIANTS" \
      --log "$OUT/bench_kernels.jsonl" >"$OUT/bench_kernels.txt" 2>&1
else
  timeout ${BENCH_S:-300} $PY kernels/bench_kernels.py --ms 16,32,64,128,256 --reps 20 \
      --variants "$VARIANTS" --log "$OUT/bench_kernels.jsonl" >"$OUT/bench_kernels.txt" 2>&1
fi
stamp "bench_kernels rc=$?"
echo; echo "=== bench_kernels (us, speed-up over cuBLAS bf16) ==="; tail -24 "$OUT/bench_kernels.txt"
stamp "done"
