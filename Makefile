# The entry point for people and CI alike.
#   make demo   set up this host (venv, Docker Engine, mmdebstrap) and build + self-check the CPU example
#   make test   set up, then run the whole test suite (Docker tests included)
#   make lint   ruff and mypy --strict
#   make bench  print the figures quoted in the README
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   ?= images/demo-cpu.yaml

.PHONY: setup venv host demo test lint bench clean

setup: venv host

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip==26.3
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

host:
	scripts/setup-host

demo: setup
	$(BIN)/reprobox build $(DEMO)

test: setup
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
