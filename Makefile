# Quick start: `make demo` and `make test`. Both create .venv from requirements.lock first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bonemets-installed

.PHONY: setup demo test test-core test-tf test-nnunet bench bench-quick bench-gpu lock clean

setup: $(STAMP)

# Rebuilt when the lock or the package metadata changes (a stale venv).
$(STAMP): requirements.lock setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

demo: setup
	$(PY) cli.py demo --out demo_out

# TensorFlow and PyTorch never share a process (TF before triton segfaults), so the
# suite runs as three pytest processes: framework-free core (with the doctests of analysis/),
# TensorFlow, PyTorch.
test: setup
	$(PY) -m pytest tests analysis -q --doctest-modules --ignore=tests/tf --ignore=tests/nnunet
	$(PY) -m pytest tests/tf -q
	$(PY) -m pytest tests/nnunet -q

test-core: setup
	$(PY) -m pytest tests analysis -q --doctest-modules --ignore=tests/tf --ignore=tests/nnunet
test-tf: setup
	$(PY) -m pytest tests/tf -q
test-nnunet: setup
	$(PY) -m pytest tests/nnunet -q

# Benchmarks (BENCHMARKS.md): ratios measured side by side in one run.
bench: setup
	$(PY) benchmarks/run.py
bench-quick: setup
	$(PY) benchmarks/run.py --quick
bench-gpu: setup
	bash benchmarks/gpu.sh

# Regenerate the lock from the current venv (after a deliberate upgrade).
lock:
	$(PY) -m pip freeze --exclude-editable --exclude bonemets | sort -f > requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info
