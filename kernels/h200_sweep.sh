#!/usr/bin/env bash
# One H200 call (< 7 min): autotune the M = 1 decode kernels, then bench_kernels with the tuned
# configs (ours, cuBLAS bf16 and the tinygemm peer in the same run) and bench_e2e (bf16,
# tinygemm, int4, nvfp4). Everything lands under $OUT; the short tables come last.
#   OUT=/tmp/o bash kernels/h200_sweep.sh            # on the GPU
#   OUT=/tmp/o bash kernels/h200_sweep.sh --ncu      # + Nsight Compute of INT4 M=1 (4096x4096)
#   OUT=/tmp/o TRITON_INTERPRET=1 COMPRESS_KERNELS=always bash kernels/h200_sweep.sh --dry-run
# Needs: torch, triton, compressed-tensors, transformers, pydantic (compress.formats imports it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a directory}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python}
DRY=0; NCU=0
for a in "$@"; do case $a in --dry-run) DRY=1;; --ncu) NCU=1;; esac; done
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/sweep.log"; }
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv >"$OUT/gpu.txt" 2>&1 || true
CFG="$OUT/tuned.json"

stamp "autotune"
if [ $DRY = 1 ]; then
  $PY kernels/autotune.py --dry-run --formats int4 --buckets 1 --budget-s 0 --out "$CFG" \
      --log "$OUT/autotune.jsonl" >"$OUT/autotune.txt" 2>&1
else  # M = 1 tuned per family and shape, one process (and time budget) each; the other
      # buckets and the "paths" limits are kept from the committed table (--base)
  cp compress/kernels/configs/nvidia_h200.json "$CFG" 2>/dev/null || echo '{}' >"$CFG"
  for fb in int4:50 int8:45 nvfp4:35 mxfp4:45; do
    timeout $(( ${fb#*:} + 25 )) $PY kernels/autotune.py --formats "${fb%%:*}" --buckets 1 \
        --budget-s "${fb#*:}" --reps 15 --base "$CFG" --out "$CFG.new" \
        --log "$OUT/autotune.jsonl" >>"$OUT/autotune.txt" 2>&1 && mv "$CFG.new" "$CFG"
  done
fi
if [ -s "$CFG" ]; then export COMPRESS_KERNEL_CONFIGS="$CFG"; else stamp "autotune failed: shipped configs"; fi
tail -12 "$OUT/autotune.txt"

stamp "bench_kernels"
if [ $DRY = 1 ]; then
  $PY kernels/bench_kernels.py --dry-run --log "$OUT/bench_kernels.jsonl" >"$OUT/bench_kernels.txt" 2>&1
else
  timeout 120 $PY kernels/bench_kernels.py --ms 1,16,64,128,256,512,2048,8192 --reps 10 \
      --log "$OUT/bench_kernels.jsonl" >"$OUT/bench_kernels.txt" 2>&1
fi
stamp "bench_kernels rc=$?"

stamp "bench_e2e"
if [ $DRY = 1 ]; then
  # the harness only (the interpreter is too slow for a whole model; bench_kernels covered it)
  COMPRESS_KERNELS=off $PY kernels/bench_e2e.py --tiny --layers 1 --formats int4,nvfp4 \
      --quantize-lm-head --prefill-len 16 --prompt-len 4 --new-tokens 2 --repeats 1 \
      --log "$OUT/bench_e2e.jsonl" >"$OUT/bench_e2e.txt" 2>&1
else
  timeout 150 $PY kernels/bench_e2e.py --formats tinygemm,int4,nvfp4 --prefill-len 2048 \
      --repeats 2 --profile "$OUT/decode_profile.txt" --log "$OUT/bench_e2e.jsonl" \
      >"$OUT/bench_e2e.txt" 2>&1
fi
stamp "bench_e2e rc=$?"

if [ $NCU = 1 ] && [ $DRY = 0 ]; then
  stamp "ncu INT4 M=1 o 4096x4096"
  timeout 60 ncu --clock-control none --kernel-name regex:_words_matmul_kernel --launch-skip 3 \
      --launch-count 1 --set full -o "$OUT/int4_m1" $PY kernels/bench_kernels.py \
      --ms 1 --shapes "o 4096x4096" --variants int4-g128 --reps 2 --log "$OUT/ncu_bench.jsonl" \
      >"$OUT/ncu.txt" 2>&1
  stamp "ncu rc=$?"
fi
cp "$CFG" "$OUT/nvidia_h200.json" 2>/dev/null || true
echo; echo "=== bench_e2e ==="; tail -8 "$OUT/bench_e2e.txt"
echo; echo "=== bench_kernels (us, speed-up over cuBLAS bf16) ==="; tail -40 "$OUT/bench_kernels.txt"
stamp "done"
