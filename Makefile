# Quickstart: `make demo` and `make test` each work from a fresh clone on a fresh machine.
#   make demo DEMO_ARGS="--minutes 2"     arguments for `trustmoe demo`
#   make test                             ruff + the whole test suite
#   make ci                               what CI runs (.ci/run): test, lint, demo, wheel smoke
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# where no CPU wheel of torch is on hand (a bare `pip install torch` pulls a multi-GB CUDA build)
TORCH_PIP_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test lint ci wheel-smoke clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION)

# Everything the chain uses is a base dependency, so the plain install runs the whole demo.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/trustmoe demo $(DEMO_ARGS)

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -ra

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

ci:
	.ci/run

wheel-smoke: $(VENV)/.installed-test
	.ci/wheel-smoke

clean:
	rm -rf $(VENV) runs .pytest_cache dist build
