# make bench / make test: set up .venv (torch and the build tools), build the extension,
# then run the benchmark or the test suite. make docs: the documentation site into site/.
# make tables: the result tables of README.md and docs/ regenerated from benchmarks/results/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
# transformers: tests/test_models.py runs Hugging Face models (about 45 s and 200 MB to install).
# Their versions (and transformers' own packages') are pinned in test-constraints.txt.
TOOLS := ninja pybind11 pytest pytest-benchmark hypothesis numpy setuptools wheel transformers
# The training frameworks of fastreg.integrations and peft (tests/test_integrations_*.py,
# tests/test_regenerate.py, bench --memory's LoRA model; about 10 s to install): in .venv
# only, as torchvision pins torch; elsewhere those tests skip.
FRAMEWORKS := accelerate lightning timm peft torchvision
CONSTRAINTS := -c test-constraints.txt
# The documentation site's tools (make docs), pinned in test-constraints.txt too.
DOCS_TOOLS := mkdocs mkdocstrings mkdocstrings-python
# The linters and formatters, in .venv only (`make lint`, `make format`).
LINT_TOOLS := ruff clang-format
CXX_SOURCES = $(shell git ls-files 'csrc/*.h' 'csrc/*.cuh' 'csrc/*.cpp' 'csrc/*.cu')

# torch's guess of the CUDA toolkit misses /usr/local/cuda when nvcc is not on PATH.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
# With no GPU visible torch cannot pick the architecture: default to Hopper only.
export TORCH_CUDA_ARCH_LIST ?= 9.0

SOURCES := setup.py fastreg/_build.py $(wildcard csrc/*/*.h csrc/*/*.cuh csrc/*/*.cpp csrc/*/*.cu)

.PHONY: bench test lint format test-install test-reference test-cudasim test-cudasim-sanitized \
	test-other-torch test-oldest-torch cudasim build setup clean gpu-check docs docs-setup \
	tables tables-check

# The same property-test examples on every run (tests/conftest.py).
export HYPOTHESIS_PROFILE ?= ci

bench: build
	$(PY) -m fastreg bench

# The whole suite on the extension, then the CUDA kernels on the CUDA simulator.
test: build
	$(PY) -m pytest -q tests
	$(MAKE) test-cudasim

# Python: ruff (lint and format, pyproject.toml); C++ and CUDA: clang-format (.clang-format).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES)

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

# The CUDA kernels on the CUDA simulator (docs/cuda-simulator.md): the simulator's own tests
# and the kernel test modules once in each block order, the property and error tests in
# random order; grids capped at 3 resident blocks, so that the grid-stride loops iterate.
CUDASIM_TESTS := tests/test_cudasim.py tests/test_dropout.py tests/test_inplace.py tests/test_fused.py \
	tests/test_penalty.py tests/test_regenerate.py
CUDASIM_ONCE := tests/test_properties.py tests/test_errors.py
CUDASIM_ENV := FASTREG_BACKEND=cudasim FASTREG_CUDASIM_BLOCKS=3

# (FASTREG_BACKEND=reference: building the simulator needs no fastreg._C)
cudasim: setup
	FASTREG_BACKEND=reference $(PY) -m fastreg._cudasim

test-cudasim: cudasim
	for order in forward reverse random; do \
	  echo "CUDA simulator, $$order block order:"; \
	  $(CUDASIM_ENV) FASTREG_CUDASIM_ORDER=$$order $(PY) -m pytest -q $(CUDASIM_TESTS) || exit 1; \
	done
	$(CUDASIM_ENV) FASTREG_CUDASIM_ORDER=random $(PY) -m pytest -q $(CUDASIM_ONCE)

# The simulator built with AddressSanitizer and UndefinedBehaviorSanitizer (random order).
# Python is not instrumented: the ASan runtime is preloaded, with libstdc++ so that ASan's
# __cxa_throw interceptor finds the real one (the simulator throws when a launch fails).
ASAN_RUNTIME = $(shell $${CXX:-c++} -print-file-name=libasan.so) $(shell $${CXX:-c++} -print-file-name=libstdc++.so)
test-cudasim-sanitized: setup
	FASTREG_BACKEND=reference $(PY) -m fastreg._cudasim --sanitize
	LD_PRELOAD="$(ASAN_RUNTIME)" ASAN_OPTIONS=detect_leaks=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 FASTREG_CUDASIM_SANITIZE=1 \
	  $(CUDASIM_ENV) FASTREG_CUDASIM_ORDER=random \
	  $(PY) -m pytest -q -p no:cacheprovider tests/test_cudasim.py tests/test_dropout.py tests/test_penalty.py

# `pip install .` as users type it (build isolation: setuptools and wheel fetched from the
# index): a pure-Python wheel carrying the sources, and the installed package finding a
# cached build (tests/test_install.py; about 20 s).
test-install: build
	FASTREG_TEST_INSTALL=1 $(PY) -m pytest -q tests/test_install.py

# The whole suite again on the pure-PyTorch fallback: every public function runs
# fastreg.reference; tests that compare kernels with it skip.
test-reference: setup
	FASTREG_BACKEND=reference $(PY) -m pytest -q tests

# The suite against another torch: by default 2.11, the GPU machine's; test-oldest-torch
# runs it against 2.4.1, the oldest that setup.py accepts. CPU kernels only, built in a
# copy of the tracked files under $(OTHER_DIR), so that its build and .venv's do not meet;
# FASTREG_BACKEND=extension makes an extension that does not load an error rather than a
# quiet fallback to the reference.
OTHER_TORCH ?= 2.11.0
OTHER_DIR ?= .other-torch
test-other-torch:
	rm -rf $(OTHER_DIR)/src && mkdir -p $(OTHER_DIR)/src
	git ls-files -z | xargs -0 cp --parents -t $(OTHER_DIR)/src
	test -x $(OTHER_DIR)/venv/bin/python || $(PYTHON) -m venv $(OTHER_DIR)/venv
	$(OTHER_DIR)/venv/bin/python -m pip install -q "torch==$(OTHER_TORCH)" $(TOOLS) $(CONSTRAINTS)
	cd $(OTHER_DIR)/src && FASTREG_CPU_ONLY=1 ../venv/bin/python setup.py -q build_ext --inplace
	cd $(OTHER_DIR)/src && FASTREG_BACKEND=extension ../venv/bin/python -m pytest -q -p no:cacheprovider tests

test-oldest-torch:
	$(MAKE) test-other-torch OTHER_TORCH=2.4.1 OTHER_DIR=.other-torch-2.4

# The documentation site (mkdocs.yml): docs/*.md and the API reference that mkdocstrings
# renders from the docstrings, read statically (no build of the extension needed), into
# site/; --strict makes every warning (a broken link or anchor, a docstring that does not
# parse) an error.
docs: docs-setup
	$(PY) -m mkdocs build --strict

docs-setup: $(VENV)/.docs-installed

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install -q $(DOCS_TOOLS) $(CONSTRAINTS)
	touch $@

# The tables between `<!-- table: ... -->` markers in README.md and docs/*.md, from the
# JSON in benchmarks/results/ (fastreg/bench/tables.py); tables-check fails where they differ.
tables: setup
	$(PY) -m fastreg.bench.tables

tables-check: setup
	$(PY) -m fastreg.bench.tables --check

build: $(VENV)/.built

setup: $(VENV)/.installed

$(VENV)/.installed: test-constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TOOLS) $(FRAMEWORKS) $(LINT_TOOLS) $(CONSTRAINTS)
	touch $@

$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build site *.egg-info fastreg/*.so $(VENV)/.built $(OTHER_DIR)/src .other-torch-2.4/src

# On the GPU machine (torch installed there, no .venv): build, CUDA tests, compute-sanitizer,
# benchmark and memory report; logs in $(OUT) or ./gpu-out. See docs/gpu-check.md.
gpu-check:
	.ci/gpu-check
