# Two commands for a fresh machine: `make demo` and `make test` (both run `setup` first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torchvision's wheel must be built for the same torch; pin a pair whose wheels belong together (both are CUDA
# builds that also run on the CPU) so pip never swaps torch for another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCHSCALE_SPEC ?= torchscale==0.3.0

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	# torchscale 0.3.0 pins timm==0.6.13 and fairscale==0.4.0, which conflict with open-clip-torch's timm>=1.0.17;
	# it runs unchanged on current timm/fairscale (tests/models/test_beit3.py proves it), so install it without its pins.
	$(PY) -m pip install -q --no-deps $(TORCHSCALE_SPEC)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/tpas demo

test: lint
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check tpas tests benchmarks
	$(VENV)/bin/ruff format --check tpas tests benchmarks

# Every benchmark (several minutes each on a 2-core CPU); results are recorded in benchmarks/RESULTS.md.
bench: setup
	set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf $(VENV) .pytest_cache
