# Quick start: `make demo` and `make test`. Both create .venv from requirements.lock first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bonemets-installed
# GPU=1 (the default where nvidia-smi lists a GPU; GPU=0 turns it off) adds the Keras wing's own
# environment .venv-tf with TensorFlow's pinned CUDA 12 wheels (requirements-gpu-tf.lock), beside
# .venv with torch's CUDA 13 wheels: one CUDA major per environment (docs/gpu.md, study/wings.py).
GPU ?= $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && echo 1 || echo 0)
TF_VENV := .venv-tf
TF_STAMP := $(TF_VENV)/.bonemets-installed

.PHONY: setup demo test test-core test-tf test-nnunet bench bench-quick bench-gpu lock lock-gpu-tf clean

setup: $(STAMP) $(if $(filter 1,$(GPU)),$(TF_STAMP))

# Rebuilt when the lock or the package metadata changes (a stale venv). The last step checks
# every installed file against its wheel's RECORD (no wheel overwrote another's files).
$(STAMP): requirements.lock setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) tools/check_wheels.py
	@touch $(STAMP)

# GPU=1: the Keras wing's environment, and the file naming each wing's interpreter in both.
$(TF_STAMP): requirements-gpu-tf.lock setup.cfg pyproject.toml $(STAMP)
	@test -x $(TF_VENV)/bin/python || $(PYTHON) -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -m pip install --quiet -r requirements-gpu-tf.lock
	$(TF_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(TF_VENV)/bin/python tools/check_wheels.py
	$(PY) -m study.wings --tf $(abspath $(TF_VENV))/bin/python --torch $(abspath $(VENV))/bin/python
	@touch $(TF_STAMP)

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

# Regenerate the Keras wing's GPU lock: TensorFlow's and-cuda extra of the locked version and
# the project's TF and test extras, every package shared with requirements.lock at its pin.
lock-gpu-tf:
	rm -rf build/lock-tf && $(PYTHON) -m venv build/lock-tf
	build/lock-tf/bin/python -m pip install --quiet -c requirements.lock ".[tf,test]" setuptools wheel \
	    "tensorflow[and-cuda]==$$(grep -i '^tensorflow==' requirements.lock | cut -d= -f3)"
	build/lock-tf/bin/python -m pip freeze --all --exclude-editable --exclude bonemets --exclude pip \
	    | sort -f > requirements-gpu-tf.lock
	rm -rf build/lock-tf

clean:
	rm -rf $(VENV) $(TF_VENV) build *.egg-info
