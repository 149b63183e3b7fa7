# Two commands on a fresh machine: `make run` (the whole product on an embedded default) and
# `make test` (the whole suite). Both create the virtualenv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install run test lint bench soak check-example chart-files clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

run: install
	$(BIN)/imm-router demo

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check router tests bench
	$(BIN)/ruff format --check router tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/rules_bench.py
	$(BIN)/python bench/e2e_bench.py --workers 2

soak: install
	$(BIN)/python bench/soak.py

# The chart bundles a copy of the shipped rules and templates; tests check they are in sync.
chart-files:
	rm -rf helm/imm-router/files/rules helm/imm-router/files/templates
	mkdir -p helm/imm-router/files
	cp -R rules helm/imm-router/files/rules
	cp -R templates helm/imm-router/files/templates

clean:
	rm -rf $(VENV) outbox .pytest_cache .mypy_cache .ruff_cache
