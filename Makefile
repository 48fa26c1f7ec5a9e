# Thin wrapper: install what is missing, configure, build, then run or test.
# The real build is CMake (CMakePresets.json); see README.md.

PRESET ?= default
BUILD_DIR := $(if $(filter asan,$(PRESET)),build-asan,build)
JOBS ?= $(shell nproc)

FUZZ_SECONDS ?= 30

.PHONY: all deps configure build run test test-asan test-heavy fuzz clean

all: build

deps:
	@tools/install-deps.sh

configure: deps
	@test -f $(BUILD_DIR)/build.ninja || cmake --preset $(PRESET)

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

run: build
	@tools/demo.sh $(BUILD_DIR)

test: build
	@ctest --preset $(PRESET) -j $(JOBS)

test-asan:
	@$(MAKE) --no-print-directory test PRESET=asan

test-heavy: build
	@ctest --test-dir $(BUILD_DIR) -L heavy --output-on-failure

# The libFuzzer target (clang) for FUZZ_SECONDS over the seeds in tests/fuzz/.
fuzz: deps
	@test -f build-fuzz/build.ninja || cmake --preset fuzz
	@cmake -S . -B build-fuzz -DCOWTAP_FUZZ_SECONDS=$(FUZZ_SECONDS) > /dev/null
	@cmake --build build-fuzz -j $(JOBS) --target cowtap_fuzzers
	@ctest --test-dir build-fuzz -L fuzz --output-on-failure

clean:
	rm -rf build build-asan build-fuzz

# Real Xen end to end (tests/xen/run.sh): Xen 4.17 + dom0 under QEMU, a Linux
# PV guest on kernel blkback, qdisk and cowtapd; a few minutes; fetches the
# Xen/kernel/QEMU packages it needs on first use.
.PHONY: test-xen install
test-xen: build
	@tests/xen/run.sh $(BUILD_DIR)

# Installs cowtapd, cowtap, cowtap-xenpv-dm, the systemd unit and the xl docs.
PREFIX ?= /usr/local
DESTDIR ?=
install: build
	@tools/xl/install.sh $(BUILD_DIR) "$(DESTDIR)" $(PREFIX)

# cowtap against a raw file and qemu-img bench on the rows of issue 4 (about a
# minute; `cowtap bench --help`). BENCH_ARGS=--quick for a few seconds.
.PHONY: bench
bench: build
	@$(BUILD_DIR)/tools/cowtap bench $(BENCH_ARGS)

# Proof in a real kernel (tests/vm/run.sh): Debian's kernel under QEMU runs
# dm/'s loop, nbd and device-mapper tests, the offload end to end, the same
# through cowtapd and `cowtap bench --offload`; fetches the kernel package on
# first use. Also run by `make test` (ctest vm_dm, about a minute).
.PHONY: test-vm
test-vm: build
	@tests/vm/run.sh $(BUILD_DIR)
