# The two commands of the README. Both install everything they need into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test setup services browser promtool lint unit

run: setup services  ## install, migrate, seed, start every process, print the URL
	$(BIN)/sagactl db upgrade
	$(BIN)/sagactl seed
	exec $(BIN)/sagactl run

test: setup services browser promtool  ## ruff, mypy, then every test tier
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e ".[test,dev]"
	touch $@

services:  ## start PostgreSQL and RabbitMQ if they are stopped; fail if they cannot start
	scripts/services.sh

browser:  ## Debian's Chromium for the browser test (Playwright's own download is blocked here)
	scripts/browser.sh

promtool:  ## Debian's promtool, which checks deploy/'s Prometheus config and alert rules
	scripts/promtool.sh

lint:
	$(BIN)/ruff check . && $(BIN)/mypy

unit:
	$(BIN)/python -m pytest tests/unit
