# One command each on a fresh machine: `make test`, `make bench`.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
ARGS    ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install test test-gpu bench eval lint clean

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

test: install
	$(VPY) -m pytest -q tests

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
	rm -rf $(VENV) build *.egg-info .pytest_cache
