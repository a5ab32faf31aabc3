# The two commands of the README: `make demo` and `make test`. Both install what they need themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install system-deps test lint typecheck unit demo bench proto clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

system-deps:
	scripts/install-system-deps.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check exporter devstack tests bench dashboards
	$(BIN)/mypy

typecheck: install
	$(BIN)/mypy

# The full suite: lint, types, then every test (real PostgreSQL, Pulsar, promtool, Prometheus, Alertmanager).
test: install system-deps lint
	$(BIN)/pytest

demo: install system-deps
	$(BIN)/python -m devstack demo

bench: install
	$(BIN)/python -m bench.run

proto: install
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/gen-proto.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .state
