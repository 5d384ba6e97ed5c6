# Everything a fresh machine needs: `make demo` and `make test` each create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.starfish-installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
# pytest-xdist workers for `make test` (each takes one torch thread; see tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: setup data demo demo-text test test-fast lint bench bench-structured bench-recovery bench-targets bench-inputs bench-compile bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

# Real data: Debian's Fashion-MNIST (the image demo falls back to scikit-learn's digits) and the
# King James Bible (bible-kjv-text: the text demo and the language-model tests).
data:
	@if [ ! -e $(FMNIST) ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
				|| echo "dataset-fashion-mnist not installable here; the demo will use digits"; \
		else echo "run 'sudo apt-get install dataset-fashion-mnist' for Fashion-MNIST; the demo will use digits"; fi; \
	fi
	@if ! command -v bible >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get update -qq && apt-get install -y -qq bible-kjv-text) \
				|| echo "bible-kjv-text not installable here; the text demo and its test cannot run"; \
		else echo "run 'sudo apt-get install bible-kjv-text' for the text demo"; fi; \
	fi

demo: setup data
	$(BIN)/starfish demo

demo-text: setup data
	$(BIN)/starfish demo --task text

test: setup data lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# The quick loop while editing: lint, types, and every test not marked slow.
test-fast: setup lint
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: setup data
	$(BIN)/python -m benchmarks.heal_speed

bench-structured: setup data
	for panel in mlp mlp_heads; do for r in 0.3 0.5 0.7; do \
		$(BIN)/python -m benchmarks.structured heal --panel $$panel --ratio $$r || exit 1; done; done
	$(BIN)/python -m benchmarks.structured latency && $(BIN)/python -m benchmarks.structured table

# The whole recovery suite of issue 5 (about 1 hour 40 minutes on 2 CPU cores; each step under 10 minutes).
bench-recovery: setup data
	PY=$(BIN)/python bash benchmarks/recovery_suite.sh

bench-targets: setup data
	$(BIN)/python -m benchmarks.targets_memory

bench-inputs: setup data
	$(BIN)/python -m benchmarks.inputs_memory

bench-compile: setup data
	$(BIN)/python -m benchmarks.compile_speed

bench-gpu: setup
	$(BIN)/python -m benchmarks.gpu_heal

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
