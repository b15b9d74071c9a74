# One command each on a fresh machine: `make test`, `make bench`.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The GPU image runs triton 3.6; CI's venv has 3.9. A second small venv compiles the kernels under 3.6.
VENV36  ?= .venv-triton36
STAMP36 := $(VENV36)/.installed
ARGS    ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install test test-gpu bench eval lint clean compile-check compile-check-triton36 kernels-report gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),)
	@echo "[install] no nvidia-smi: installing the CPU build torch==2.13.0"
	$(VPY) -m pip install -q torch==2.13.0
endif
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(STAMP36): pyproject.toml
	test -x $(VENV36)/bin/python || $(PY) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install -q torch==2.13.0 triton==3.6.0 numpy
	touch $(STAMP36)

# The suite includes the sm_90a / sm_80 compile check under CI's triton (tests/test_compile_check.py);
# on a machine without a GPU it then runs once more under triton 3.6, the GPU image's version.
test: install
	$(VPY) -m pytest -q tests
ifeq ($(HAS_GPU),)
	$(MAKE) compile-check-triton36
endif

# Compile every kernel for sm_90a and sm_80 (no GPU needed); fails on errors, spills, shared memory.
compile-check: install
	env -u TRITON_INTERPRET $(VPY) -m spacache_kernels.compile_check $(ARGS)

compile-check-triton36: $(STAMP36)
	env -u TRITON_INTERPRET PYTHONPATH=. $(VENV36)/bin/python -m spacache_kernels.compile_check $(ARGS)

# Regenerate docs/kernels.md (registers, spills, shared memory, wgmma, occupancy, grids) from the check.
kernels-report: install
	env -u TRITON_INTERPRET $(VPY) -m spacache_kernels.compile_check --write-docs docs/kernels.md $(ARGS)

# One prepared run on an H100/H200 (< 8 min): gpu tests, kernel benchmarks, e2e, autotuner choices.
# Runs on the GPU image as it is: its python3, no venv, no install step.
gpu-check:
	PYTHONPATH=. $(PY) -m bench.gpu_check $(ARGS)

test-gpu: install
	$(VPY) -m pytest -q -m gpu tests

bench: install
	$(VPY) -m bench $(ARGS)

# Generation quality of every caching policy on both tiny trained checkpoints (CPU, 15-20 min).
eval: install
	$(VPY) -m bench.eval $(ARGS)

lint: install
	$(VPY) -m ruff check spacache_kernels tests bench

clean:
	rm -rf $(VENV) $(VENV36) build *.egg-info .pytest_cache
