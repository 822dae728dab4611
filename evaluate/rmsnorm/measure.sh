#!/usr/bin/env bash
# SmolLM2-135M: INT4 RTN with and without norm folding (evaluate/RESULTS.md, "## rmsnorm").
# Run from the repository root: bash evaluate/rmsnorm/measure.sh [OUT_DIR]
set -euo pipefail
export PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=${1:-/tmp/rmsnorm-measure}
mkdir -p "$out"
ev() { python -m compress evaluate "$1" --baseline smollm2-135m --seq-len 512 --max-tokens 8192 \
         -o "$out/$2.json" | tail -1; }
python -m compress apply recipes/rmsnorm.yaml smollm2-135m -o "$out/fold" --overwrite
ev "$out/fold" fold
for recipe in recipes/int4-rtn.yaml recipes/fold-norms-int4.yaml \
              evaluate/rmsnorm/int4-rtn-channel.yaml evaluate/rmsnorm/fold-norms-int4-channel.yaml; do
  name=$(basename "$recipe" .yaml)
  python -m compress apply "$recipe" smollm2-135m -o "$out/$name" --overwrite
  ev "$out/$name" "$name"
  rm -rf "$out/$name/model.safetensors"
done
