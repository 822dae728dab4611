#!/bin/bash
# Reproduce the GPTQ/AWQ/FP4 figures of evaluate/RESULTS.md (run from the repository root).
# Artifacts go to /tmp/gptq-figures/<name>; results to evaluate/gptq/results/<name>.json.
set -u
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
mkdir -p evaluate/gptq/results
[ -f evaluate/gptq/results/baseline.json ] ||
  python -m compress evaluate smollm2-135m -o evaluate/gptq/results/baseline.json > /dev/null
for name in ${@:-int4-sym-g64-rtn int4-sym-g64-gptq int4-sym-g64-awq-gptq nvfp4-rtn nvfp4-gptq mxfp4-rtn mxfp4-gptq int4-asym-g64-rtn int4-asym-g64-gptq int4-asym-g128-rtn int4-asym-g128-gptq}; do
  start=$(date +%s)
  python -m compress apply evaluate/gptq/$name.yaml smollm2-135m -o /tmp/gptq-figures/$name --overwrite > /tmp/gptq-figures-$name.log 2>&1 || { echo "$name FAILED"; continue; }
  end=$(date +%s)
  python -m compress evaluate /tmp/gptq-figures/$name -o evaluate/gptq/results/$name.json > /dev/null
  python - "$name" "$((end - start))" <<'PY'
import json, sys
name, seconds = sys.argv[1], int(sys.argv[2])
path = f"evaluate/gptq/results/{name}.json"
result = json.load(open(path)); result["apply_seconds"] = seconds
json.dump(result, open(path, "w"), indent=2)
print(name, round(result["perplexity"], 3), f"{seconds}s", flush=True)
PY
done
