# Two commands do everything on a fresh machine:  make demo   and   make test
# A second run reuses .venv and the CMake build directory, rebuilding only what changed.

PYTHON_BOOT ?= python3
TORCH_SPEC  ?= torch==2.13.0
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip --disable-pip-version-check
CONSTRAINT  := $(VENV)/torch-constraint.txt
DEPS_STAMP  := $(VENV)/.deps-$(subst /,_,$(subst =,_,$(TORCH_SPEC)))
BUILD_STAMP := build/.installed
SOURCES     := $(shell find csrc python cmake -type f 2>/dev/null) CMakeLists.txt pyproject.toml
PYTEST_ARGS ?=

.PHONY: all build demo test test-fast cpp-test bench lint format clean distclean

all: build

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, then a constraint pinning the installed version so no later install swaps it.
$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PY) -W ignore -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINT)
	$(PIP) install -q -c $(CONSTRAINT) -r requirements-dev.txt
	rm -f $(VENV)/.deps-* && touch $@

# --no-build-isolation: build against the torch in .venv, never a freshly downloaded one.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

build: $(BUILD_STAMP)

demo: build
	$(PY) benches/demo.py

test: build lint cpp-test
	$(PY) -m pytest tests $(PYTEST_ARGS)
	ZEROCKPT_BENCH_SMOKE=1 $(PY) -m pytest benches -q --benchmark-disable -p no:cacheprovider

# The C++ API: the example program (add_subdirectory consumer) and its ctest tests, which
# include Python <-> C++ round trips through the installed zerockpt package.
cpp-test: build
	$(VENV)/bin/cmake -S examples/cpp -B build/cpp -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja -DPython_EXECUTABLE=$(abspath $(PY)) > build/cpp-configure.log || (cat build/cpp-configure.log; false)
	$(VENV)/bin/cmake --build build/cpp
	cd build/cpp && $(abspath $(VENV))/bin/ctest --output-on-failure

test-fast: build
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

bench: build
	$(PY) -m pytest benches --benchmark-columns=min,median,max,rounds --benchmark-sort=name $(PYTEST_ARGS)

CXX_SOURCES := $(shell find csrc examples -name '*.cpp' -o -name '*.h' 2>/dev/null)

lint: $(DEPS_STAMP)
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES)
	$(PY) -m ruff check python tests benches examples
	$(PY) -m ruff format --check python tests benches examples
	$(PY) -m mypy

format: $(DEPS_STAMP)
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)
	$(PY) -m ruff format python tests benches examples
	$(PY) -m ruff check --fix python tests benches examples

clean:
	rm -rf build

distclean: clean
	rm -rf $(VENV)
