#!/usr/bin/env bash
# The wheels the H200 machine lacks (its image: torch 2.11, triton 3.6, transformers 5.17, no
# pydantic, compressed-tensors, gguf or loguru), downloaded here into .whl/ (git-ignored) at the
# versions this checkout's .venv runs, for Python 3.12 on manylinux x86_64. A device call then
# names ".whl" in carry and starts with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit
# (the workplace's device README, "a Python package missing there"). Kept as a script because
# .whl/ does not survive a new checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
names=(pydantic pydantic_core annotated-types typing-inspection compressed-tensors gguf loguru)
pins=()
for name in "${names[@]}"; do
    pins+=("$name==$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")")
done
rm -rf .whl && mkdir .whl
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
# one version of each, no dependencies pulled: two versions of a package stop the install there
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "${pins[@]}"
ls .whl
