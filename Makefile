# Two commands set everything up from nothing: `make test` and `make demo`.
# Each creates .venv if missing, installs requirements.txt once (re-run only when it changes),
# builds the extensions (re-run only when csrc/, setup.py or pyproject.toml change), then runs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.raad-deps
BUILT := $(VENV)/.raad-built
SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \)) setup.py pyproject.toml
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: test demo kernel-demo build bench bench-cpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements.txt | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The editable install builds both extensions in place; build/temp keeps ninja's objects so a
# later rebuild recompiles only what changed.
$(BUILT): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

# RAAD end to end: synthetic data -> fit (HQS plan) -> score fp32 and plan -> bench -> report
demo: build
	$(VENV)/bin/raad demo --out $(DEMO_OUT)

# the kernels alone: accuracy of each bit-width against float64, and the backends available
kernel-demo: build
	$(PY) -m raad_kernels.demo

bench-cpu: build
	$(PY) -m pytest benchmarks/test_bench_cpu.py --benchmark-only -q

clean:
	rm -rf build *.egg-info raad_kernels/*.so $(BUILT)
