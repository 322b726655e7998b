# Two entry points: `make demo` (train the default recipe on Fashion-MNIST-LT) and
# `make test` (the test suite). Both create .venv and install into it when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_CONFIG ?= configs/fashion-mnist/demo.yaml
DEMO_OUT    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test install install-dev fashion-mnist lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Debian's package where we can install it (this project's machines), torchvision's
# download elsewhere; a no-op when the files are already there.
fashion-mnist: install
	@if ! $(BIN)/longtail data download fashion-mnist --check >/dev/null 2>&1 \
	    && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null 2>&1 || true; \
	fi
	$(BIN)/longtail data download fashion-mnist

demo: install fashion-mnist
	$(BIN)/longtail train --config $(DEMO_CONFIG) --out $(DEMO_OUT)
	@echo "results: $(DEMO_OUT)/eval_test.json, per-epoch log: $(DEMO_OUT)/metrics.jsonl, report: $(DEMO_OUT)/report.html"

test: install-dev
	$(BIN)/python -m pytest -q

lint: install-dev
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
