# Two commands do everything on a fresh machine:  make demo   and   make test
# A second run reuses .venv and the CMake build directory, rebuilding only what changed.

PYTHON_BOOT ?= python3
TORCH_SPEC  ?= torch==2.13.0
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip --disable-pip-version-check
CONSTRAINT  := $(VENV)/torch-constraint.txt
DEPS_STAMP  := $(VENV)/.deps-$(subst /,_,$(subst =,_,$(TORCH_SPEC)))
# One CMake build tree for everything: the Python extension, the C++ package and the ctest
# programs link the same static libraries, compiled once.
BUILD_DIR   := build/py
BUILD_STAMP := build/.installed
SOURCES     := $(shell find csrc python cmake tools -type f 2>/dev/null) CMakeLists.txt pyproject.toml
PYTEST_ARGS ?=
.PHONY: all build demo test bench-smoke test-long test-fast cpp-test fuzz fuzz-optional fuzz-build-optional bench lint format \
        compat gpu-check clean distclean

all: build

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, then a constraint pinning the installed version so no later install swaps it.
# --no-compile: pip would byte-compile all ~12,700 .py files of the dependencies (about 50 CPU
# seconds here, torch alone 10); Python compiles the modules actually imported on first import
# and caches them.
$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PIP) install -q --no-compile "$(TORCH_SPEC)"
	$(PY) -W ignore -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINT)
	$(PIP) install -q --no-compile -c $(CONSTRAINT) -r requirements-dev.txt
	rm -f $(VENV)/.deps-* && touch $@

# --no-build-isolation: build against the torch in .venv, never a freshly downloaded one.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -C build-dir=$(BUILD_DIR) -e .
	@mkdir -p build && touch $@

build: $(BUILD_STAMP)

# The main job: `zerockpt bench` on a GPT-2-small-sized model (500 MB fp32) in this directory:
# save, load and load + read with zerockpt, torch and safetensors, bitwise checked, as a table
# and a bar chart.
demo: build
	$(PY) -m zerockpt bench --params 125M --plot build/bench.png

# The build and the checks that precede pytest run side by side on the 2 cores, each starting
# as soon as what it needs is there: the fuzzer's build (where clang can be had) beside the
# dependency installs; lint and the test accelerator's build (they need only the installed
# dependencies) beside the extension's build; the C++ tests after it. Then pytest on both cores
# (pytest-xdist: a second worker fills the gaps its tests' child processes and fsyncs leave),
# so its results are never hidden behind the fuzzer. Last, side by side: the benchmarks' smoke
# run (tiny inputs, mostly waiting on fsync) and the fuzz run (one core), which is skipped with
# one line where clang with libFuzzer cannot be had (no root, no apt-get).
test:
	@$(MAKE) --no-print-directory -j2 --output-sync=target build lint cpp-test test-accel fuzz-build-optional
	$(PY) -m pytest tests -n 2 $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory -j2 --output-sync=target bench-smoke fuzz-optional

# Every benchmark once on tiny inputs, untimed: checks that each one runs and checks its results.
bench-smoke: build
	ZEROCKPT_BENCH_SMOKE=1 $(PY) -m pytest benches -q --benchmark-disable -p no:cacheprovider

# The long trial counts: 200 SIGKILLs of save, 50 of the Checkpointer, the upstream safetensors
# test that writes 4 x 200 MB (ZEROCKPT_TEST_LONG), 10 minutes of fuzzing.
test-long: build
	ZEROCKPT_TEST_LONG=1 ZEROCKPT_CRASH_TRIALS=200 ZEROCKPT_CHECKPOINTER_CRASH_TRIALS=50 \
	  $(PY) -m pytest tests $(PYTEST_ARGS)
	$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=600


# The C++ API, linked against the same static libraries as the extension (no recompilation):
# the core's unit tests in the build tree, then the find_package(zerockpt) consumer in
# examples/cpp against the installed CMake package, with Python <-> C++ round trips.
CMAKE := $(VENV)/bin/cmake
cpp-test: build
	$(CMAKE) --build $(BUILD_DIR) --target zerockpt_unit_tests
	cd $(BUILD_DIR) && $(abspath $(VENV))/bin/ctest --output-on-failure
	$(CMAKE) --install $(BUILD_DIR) --component cpp --prefix build/cpp-prefix > /dev/null
	$(CMAKE) -S examples/cpp -B build/cpp -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_PREFIX_PATH=$(abspath build/cpp-prefix) \
	  > build/cpp-configure.log || (cat build/cpp-configure.log; false)
	$(CMAKE) --build build/cpp
	cd build/cpp && $(abspath $(VENV))/bin/ctest --output-on-failure

# Coverage-guided fuzzing of the torch-free core (fuzz/README.md): libFuzzer with ASan and UBSan
# over every csrc/core source, FUZZ_SECONDS per run. Needs clang with libFuzzer; the stamp
# step installs Debian's clang once if root and apt-get allow. A finding fails the target and
# leaves the input in build/fuzz/. FUZZ_ARGS passes more libFuzzer flags (-fork=N, -runs=N...).
FUZZ_CXX     ?= clang++
FUZZ_SECONDS ?= 30
FUZZ_ARGS    ?=
FUZZ_DIR     := build/fuzz
FUZZ_BIN     := $(FUZZ_DIR)/fuzz_reader
FUZZ_CXXFLAGS := -std=c++17 -O1 -g -fno-omit-frame-pointer -pthread \
                 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
                 -Wall -Wextra -Wno-unused-parameter -Icsrc/include -Icsrc
FUZZ_OBJS    := $(patsubst csrc/core/%.cpp,$(FUZZ_DIR)/obj/%.o,$(wildcard csrc/core/*.cpp)) \
                $(FUZZ_DIR)/obj/fuzz_reader.o
FUZZ_CXX_OK  := $(FUZZ_DIR)/.cxx-ok-$(subst /,_,$(FUZZ_CXX))
FUZZ_CORPORA := $(FUZZ_DIR)/corpus fuzz/seeds $(wildcard tests/corpus)
FUZZ_FLAGS   := -dict=fuzz/safetensors.dict -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
                -malloc_limit_mb=16 -print_final_stats=1 -artifact_prefix=$(FUZZ_DIR)/

$(FUZZ_CXX_OK): fuzz/ensure_clang.sh
	@sh fuzz/ensure_clang.sh $(FUZZ_CXX)
	@mkdir -p $(@D) && touch $@

# make test's fuzz step: runs `fuzz` when clang with libFuzzer is there or can be installed;
# otherwise it says why in one line and succeeds (`make fuzz` itself then fails). A finding
# always fails.
fuzz-optional:
	@if sh fuzz/ensure_clang.sh $(FUZZ_CXX); then $(MAKE) --no-print-directory fuzz; \
	else echo "fuzz: skipped (reason above); the tests above ran and passed"; fi

fuzz-build-optional:
	@if sh fuzz/ensure_clang.sh $(FUZZ_CXX); then $(MAKE) --no-print-directory $(FUZZ_BIN); \
	else echo "fuzz: clang with libFuzzer is not available here (reason above)"; fi

$(FUZZ_DIR)/obj/%.o: csrc/core/%.cpp | $(FUZZ_CXX_OK)
	@mkdir -p $(@D)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) -MMD -MP -c $< -o $@

$(FUZZ_DIR)/obj/%.o: fuzz/%.cpp | $(FUZZ_CXX_OK)
	@mkdir -p $(@D)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) -MMD -MP -c $< -o $@

$(FUZZ_BIN): $(FUZZ_OBJS)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) $^ -o $@

-include $(FUZZ_OBJS:.o=.d)

fuzz: $(FUZZ_BIN)
	@mkdir -p $(FUZZ_DIR)/corpus
	@echo "fuzz: $(FUZZ_SECONDS) s over $(FUZZ_CORPORA) (log: $(FUZZ_DIR)/fuzz.log)"
	@if $(FUZZ_BIN) $(FUZZ_CORPORA) $(FUZZ_FLAGS) -max_total_time=$(FUZZ_SECONDS) $(FUZZ_ARGS) \
	    > $(FUZZ_DIR)/fuzz.log 2>&1; then \
	  grep -E '^(#[0-9]+[[:space:]]+DONE|stat::|Done )' $(FUZZ_DIR)/fuzz.log || true; \
	else \
	  tail -n 60 $(FUZZ_DIR)/fuzz.log; \
	  input=$$(ls -t $(FUZZ_DIR)/crash-* $(FUZZ_DIR)/leak-* $(FUZZ_DIR)/timeout-* \
	           $(FUZZ_DIR)/oom-* 2>/dev/null | head -n 1); \
	  echo "fuzz: FAILED; the input is saved as $${input:-(none written; see $(FUZZ_DIR)/fuzz.log)}"; \
	  echo "fuzz: reproduce with: $(FUZZ_BIN) $${input:-<file>}"; \
	  exit 1; \
	fi

# Against another torch, in a venv of its own (.venv-compat-<version>, a build dir of its own):
# PyPI's torch wheel, a CUDA build of several GB downloaded once and kept in pip's cache. It
# builds with no CUDA toolkit, checks that the main build's extension refuses this torch with a
# clear ImportError, builds the test accelerator against it and runs the whole suite (CUDA tests
# skip without a GPU).
COMPAT_TORCH ?= 2.11.0
COMPAT_VENV  := .venv-compat-$(COMPAT_TORCH)
COMPAT_PY    := $(COMPAT_VENV)/bin/python
compat: build
	test -x $(COMPAT_PY) || $(PYTHON_BOOT) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip --disable-pip-version-check install -q "torch==$(COMPAT_TORCH)"
	$(COMPAT_PY) -W ignore -c "import torch; print('torch==' + torch.__version__)" > $(COMPAT_VENV)/torch-constraint.txt
	$(COMPAT_PY) -m pip --disable-pip-version-check install -q -c $(COMPAT_VENV)/torch-constraint.txt -r requirements-dev.txt
	$(COMPAT_PY) -m pip --disable-pip-version-check install -q --no-build-isolation --no-deps \
	  -C build-dir=build/compat-$(COMPAT_TORCH) --force-reinstall .
	$(COMPAT_PY) tools/check_torch_pin.py $(abspath $(PY))
	$(COMPAT_VENV)/bin/cmake -S tests/accel -B build/accel-compat-$(COMPAT_TORCH) -G Ninja \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(COMPAT_VENV))/bin/ninja -DPython_EXECUTABLE=$(abspath $(COMPAT_PY)) > /dev/null
	$(COMPAT_VENV)/bin/cmake --build build/accel-compat-$(COMPAT_TORCH)
	ZEROCKPT_TEST_ACCEL=$(abspath build/accel-compat-$(COMPAT_TORCH))/libzerockpt_test_accel.so \
	  $(COMPAT_PY) -m pytest tests -p no:cacheprovider -q $(PYTEST_ARGS)

# On a machine with a GPU, a CUDA torch and no network (the borrowed H200): build, CUDA tests,
# GPU bench; results under $$OUT (tools/gpu_check.sh).
gpu-check:
	sh tools/gpu_check.sh

test-fast: build
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

bench: build
	$(PY) -m pytest benches --benchmark-columns=min,median,max,rounds --benchmark-sort=name $(PYTEST_ARGS)

CXX_SOURCES := $(shell find csrc examples fuzz tests/cpp -name '*.cpp' -o -name '*.h' 2>/dev/null)

lint: $(DEPS_STAMP)
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES)
	$(PY) -m ruff check python tests benches examples fuzz tools
	$(PY) -m ruff format --check python tests benches examples fuzz tools
	$(PY) -m mypy

format: $(DEPS_STAMP)
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)
	$(PY) -m ruff format python tests benches examples fuzz tools
	$(PY) -m ruff check --fix python tests benches examples fuzz tools

clean:
	rm -rf build

distclean: clean
	rm -rf $(VENV) .venv-compat-*

# --- Test accelerator (issue 21) ------------------------------------------------------------
# tests/accel: "zpu", a PrivateUse1 backend with asynchronous streams that only the tests load
# (docs/device_testing.md). Built with CMake into build/accel, never installed; `make test`
# builds it, a second run does nothing. test-device-stress runs the device tests
# STRESS_RUNS times with random stream delays (a new seed each run); sabotage-device shows that
# each stream wait, event record and synchronisation of the pipeline is needed.
ACCEL_DIR    := build/accel
ACCEL_LIB    := $(ACCEL_DIR)/libzerockpt_test_accel.so
DEVICE_TESTS := tests/test_device.py
STRESS_RUNS  ?= 20
STRESS_DELAY ?= 0-300
CXX_SOURCES  += $(wildcard tests/accel/*.cpp)

.PHONY: test-accel test-device-stress sabotage-device

$(ACCEL_DIR)/build.ninja: tests/accel/CMakeLists.txt cmake/TorchSetup.cmake | $(DEPS_STAMP)
	@mkdir -p $(ACCEL_DIR)
	$(VENV)/bin/cmake -S tests/accel -B $(ACCEL_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja -DPython_EXECUTABLE=$(abspath $(PY)) > $(ACCEL_DIR)/configure.log || (cat $(ACCEL_DIR)/configure.log; false)

$(ACCEL_LIB): $(ACCEL_DIR)/build.ninja tests/accel/zpu.cpp
	$(VENV)/bin/cmake --build $(ACCEL_DIR)
	@touch $@

test-accel: $(ACCEL_LIB)


test-device-stress: build test-accel
	@for i in $$(seq 1 $(STRESS_RUNS)); do \
	  echo "device stress run $$i/$(STRESS_RUNS): ZPU_SEED=$$i ZPU_DELAY_US=$(STRESS_DELAY)"; \
	  ZPU_SEED=$$i ZPU_DELAY_US=$(STRESS_DELAY) $(PY) -m pytest $(DEVICE_TESTS) -q -x \
	    -p no:cacheprovider $(PYTEST_ARGS) || exit 1; \
	done

sabotage-device: build test-accel
	sh tools/sabotage_device.sh
