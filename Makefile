# The README's two commands: `make demo` (the main job) and `make test` (the tests).
# Both create .venv on first use and install what they need (Debian's aarch64 cross linker too).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    := out
MODEL  ?= shufflenet_v1_g3_x1_0
PYTEST_ARGS ?=

.PHONY: demo test venv cross clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# Debian's aarch64 cross linker (needs root or sudo; skipped when already there).
cross:
	@command -v aarch64-linux-gnu-g++ >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq g++-aarch64-linux-gnu; }

TRACKER := 127.0.0.1:9190
TUNE_TRIALS ?= 64
MY_RECORDS := $(OUT)/tuning_logs/host/$(MODEL)

# The shipped records of this CPU (tuning_logs/host-<cpu>/: each CPU's records in a dir of their
# own), or where none were shipped for it, another CPU's (a build sets them aside with a note).
# Expanded when the demo runs, after .venv exists.
HOST_RECORDS = $(shell $(BIN)/python -c "from tvmshuffle import targets; print(targets.records_name(targets.resolve('host')))")
RECORDS = $(firstword $(wildcard tuning_logs/$(HOST_RECORDS)/$(MODEL)) $(wildcard tuning_logs/host-*/$(MODEL)))

# The main job, on whatever CPU this is: the untuned build, the hand-scheduled build (no tuning),
# a short tuning run on this CPU seeded from the hand schedules and the build with its records,
# the shipped records (applied where this CPU is theirs, set aside with a note elsewhere), the
# per-layer study; then the emulated ARM device (NEON hand schedules, correctness only).
demo: venv cross
	@mkdir -p $(OUT)
	$(BIN)/tvmshuffle models
	$(BIN)/tvmshuffle inspect $(MODEL) --no-fuse | tail -n 1
	$(BIN)/tvmshuffle inspect $(MODEL) | tail -n 1
	$(BIN)/python -c "import numpy as np; np.save('$(OUT)/input.npy', np.random.default_rng(0).standard_normal((1,3,224,224)).astype('float32'))"
	@# TVM alone: no hand schedules, no tuning records (the raw baseline)
	$(BIN)/tvmshuffle compile $(MODEL) --target host --schedules none -o $(OUT)/$(MODEL)-host.so
	$(BIN)/tvmshuffle run $(OUT)/$(MODEL)-host.so --input $(OUT)/input.npy --output $(OUT)/output.npy --repeat 30 --print-time
	@# the default build: the hand schedules of schedules/ (AVX2 or NEON, from the ISA), no tuning
	$(BIN)/tvmshuffle compile $(MODEL) --target host -o $(OUT)/$(MODEL)-host-hand.so
	$(BIN)/tvmshuffle run $(OUT)/$(MODEL)-host-hand.so --input $(OUT)/input.npy --repeat 30 --print-time
	@# a short tuning run on this CPU, its design space seeded with the hand schedules (the default; resumes)
	$(BIN)/tvmshuffle tune $(MODEL) --target host --trials $(TUNE_TRIALS) --tuning-records $(MY_RECORDS)
	@# each kernel: the faster of its best record and its hand schedule
	$(BIN)/tvmshuffle compile $(MODEL) --target host --tuning-records $(MY_RECORDS) -o $(OUT)/$(MODEL)-host-tuned.so
	$(BIN)/tvmshuffle run $(OUT)/$(MODEL)-host-tuned.so --input $(OUT)/input.npy --repeat 30 --print-time
	@# the shipped records: this CPU's where there are some, else another CPU's, set aside (a note)
	$(BIN)/tvmshuffle compile $(MODEL) --target host --tuning-records $(RECORDS) -o $(OUT)/$(MODEL)-host-shipped.so
	$(BIN)/tvmshuffle run $(OUT)/$(MODEL)-host-shipped.so --input $(OUT)/input.npy --repeat 30 --print-time
	$(BIN)/tvmshuffle study --model $(MODEL) -o $(OUT)/study
	$(BIN)/tvmshuffle compile $(MODEL) --target aarch64 -o $(OUT)/$(MODEL)-aarch64.so
	$(BIN)/tvmshuffle device up
	$(BIN)/tvmshuffle run $(OUT)/$(MODEL)-aarch64.so --input $(OUT)/input.npy --rpc-tracker $(TRACKER) --rpc-key emu-aarch64 --repeat 3 --print-time
	$(BIN)/tvmshuffle device down

# Every test: first all but the emulated device's, on one xdist worker per core (a module with
# module-scoped fixtures stays on one worker, see its xdist_group), then the emulated device's
# alone (its tracker was killed at start when it ran beside the parallel tests: not yet
# understood); each names its 10 slowest tests. Exit 5 (nothing selected) is not a failure.
test: venv cross
	$(BIN)/python -m pytest -n auto --dist loadgroup --durations=10 --ignore=tests/test_device.py $(PYTEST_ARGS)
	$(BIN)/python -m pytest --durations=10 tests/test_device.py $(PYTEST_ARGS) || [ $$? = 5 ]

clean:
	rm -rf $(OUT) .pytest_cache
