#!/usr/bin/env bash
# The peer comparison (evaluate/peer_llmcompressor.py) on a GPU machine, one batch of settings
# per call, within a time limit; rows are cached under WORK, so a second call with the same
# arguments resumes where the first stopped. llm-compressor runs in the same Python
# (LLMC_PYTHON defaults to this python; the script strips PYTHONPATH for its subprocess).
# Usage: bash evaluate/peer_gpu.sh [peer_llmcompressor.py arguments...]
#   e.g. bash evaluate/peer_gpu.sh --settings int4-sym-g64 nvfp4
# Writes the cached rows and the log to $OUT (default ./out/peer-gpu); prints the table last.
set -uo pipefail
OUT=${OUT:-out/peer-gpu}
WORK=${WORK:-/tmp/peer-gpu}
LIMIT=${LIMIT:-330}
mkdir -p "$OUT" "$WORK"
PYTHON=${PYTHON:-python}
export PYTHONPATH=. LLMC_PYTHON=${LLMC_PYTHON:-$(command -v "$PYTHON")}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
timeout "$LIMIT" "$PYTHON" evaluate/peer_llmcompressor.py --work "$WORK" --samples 64 \
    --seq-len 512 --eval-tokens 8192 "$@" > "$OUT/peer.log" 2>&1
rc=$?
cp "$WORK"/*.json "$OUT"/ 2>/dev/null
cp "$WORK"/*.log "$OUT"/ 2>/dev/null
grep -v "it/s\]" "$OUT/peer.log" | tail -25
echo "exit $rc (124: stopped at ${LIMIT}s; run the same command again to resume)"
