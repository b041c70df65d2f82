# The two commands a newcomer needs: `make test` and `make bench`. Each sets up .venv as needed.
PYTHON ?= python3
VENV   ?= .venv
# This machine keeps a CPU build of torch on disk; a GPU user may pre-install a CUDA build into
# .venv (or pass TORCH_SPEC='torch==2.13.0' with their index): an importable torch is never replaced.
TORCH_SPEC ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hyperkern-installed
PYTEST_ARGS ?=
# test files run on this many pytest-xdist workers, each file whole on one worker (its module
# fixtures, e.g. gpu-check's dry run, run once); 0 runs them in this process
PYTEST_WORKERS ?= 2

.PHONY: test bench bench-suite verify info compile-check gpu-check clean venv

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest tests -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m hyperkern bench

verify: $(STAMP)
	$(PY) -m hyperkern verify

info: $(STAMP)
	$(PY) -m hyperkern info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks bench-results gpu-results

bench-suite: $(STAMP)
	$(PY) -m pytest benchmarks $(PYTEST_ARGS)

compile-check: $(STAMP)
	$(PY) -m hyperkern compile-check

# On a lent GPU: a plain checkout on a machine that has torch and Triton already (no venv, no
# install step, no network). Uses .venv's Python when there is one, else $(PYTHON).
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m hyperkern gpu-check --out gpu-results
