# The two commands of the README: `make demo` and `make test`. Each sets everything up on a
# fresh machine (a .venv with torch + triton, pyruntime._C built in place) and then does its job.
# GPU users bring their own torch: `make TORCH_SPEC=torch` (or install it into .venv first).
PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
DEPS_STAMP  := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.ext-built
CSRC        := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu') setup.py
NPROC       ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: all setup build demo test test-cpp test-py bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(CSRC)
	MAX_JOBS=$(NPROC) $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps --use-pep517 -e .
	touch $@

setup: $(BUILD_STAMP)
build: $(BUILD_STAMP)

# Richest layout that exists, on the embedded corpus.
demo: $(BUILD_STAMP)
	$(PY) -m pyruntime demo

test-cpp:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cmake -j$(NPROC)
	ctest --test-dir build/cmake --output-on-failure

test-py: $(BUILD_STAMP)
	$(PY) -m pytest -q --durations=15 tests   # the slowest tests listed: keep the suite under 15 min on CI

test: test-cpp test-py

bench: $(BUILD_STAMP)
	$(PY) -m pyruntime bench all   # every suite of `pyruntime bench --help` with its defaults

clean:
	rm -rf build *.egg-info pyruntime/_C*.so
