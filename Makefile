# The two commands of the README: `make run` and `make test`.
# Both create or refresh .venv and install the project with its pinned dependencies.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test venv lint bench check clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ReplyX needs Python 3.11 or newer (set PYTHON=...)")'
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/replyx run

test: $(STAMP)
	@bash .ci/system-packages
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/replyx bench

check: $(STAMP)
	$(VENV)/bin/replyx check

clean:
	rm -rf $(VENV) build *.egg-info
