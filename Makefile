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

.PHONY: test demo kernel-demo build bench bench-cpu clean simde

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

# The SIMDe headers let tests/test_cpu_backend.py run the AVX-512 kernels emulated on a CPU
# without AVX-512 (csrc/cpu/emu/). Installed when missing where apt-get can (as root); elsewhere
# those tests are left out and one test says why.
SIMDE_HEADER := /usr/include/simde/x86/avx512.h
simde:
	@test -e $(SIMDE_HEADER) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  export DEBIAN_FRONTEND=noninteractive && \
	  { timeout 180 apt-get install -y -q libsimde-dev >/dev/null 2>&1 || \
	    { timeout 180 apt-get update -q >/dev/null 2>&1 && \
	      timeout 180 apt-get install -y -q libsimde-dev >/dev/null 2>&1; }; }; } || \
	  echo "note: SIMDe headers not installed: the emulated AVX-512 CPU tests will be skipped"

test: build simde
	$(PY) -m pytest -q $(PYTEST_ARGS)

# RAAD end to end: synthetic data -> fit (HQS plan) -> score fp32 and plan -> bench -> report
demo: build
	$(VENV)/bin/raad demo --out $(DEMO_OUT)

# the kernels alone: accuracy of each bit-width against float64, and the backends available
kernel-demo: build
	$(PY) -m raad_kernels.demo

# the detector against its deployment peers (torch.compile, bf16 autocast, OpenVINO fp32 /
# default / NNCF INT8) on two real-photo categories at 256 px: BENCH_OUT/peers.md
BENCH_OUT ?= bench_out
bench: build
	$(PY) benchmarks/detector_peers.py $(BENCH_OUT)

bench-cpu: build
	$(PY) -m pytest benchmarks/test_bench_cpu.py --benchmark-only -q

clean:
	rm -rf build *.egg-info raad_kernels/*.so $(BUILT)
