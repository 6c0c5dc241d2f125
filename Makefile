# The two commands of the README: `make run` and `make test`.
# Both create or refresh .venv and install the project with its pinned dependencies:
# pyproject.toml pins the direct ones, constraints.txt every transitive one (`make lock`).

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist), each given whole test files, so a module's shared
# stack is started once; every worker has its own database (tests/fix_db.py).
# PYTEST_WORKERS=0 runs the suite in this one process.
PYTEST_WORKERS ?= 2

.PHONY: run test typecheck venv lint lock bench check clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ReplyX needs Python 3.11 or newer (set PYTHON=...)")'
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev,bench]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/replyx run

test: $(STAMP)
	@bash .ci/system-packages
	$(VENV)/bin/ruff check .
	@$(MAKE) --no-print-directory typecheck
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# mypy's configuration (strict, the packages it checks) is in pyproject.toml.
typecheck: $(STAMP)
	$(VENV)/bin/mypy

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Re-resolve every dependency from pyproject.toml alone, in a scratch venv, and pin the
# result (pip itself and the project excepted) in constraints.txt. Run it after changing a
# pin in pyproject.toml, and commit both files.
LOCK_VENV := $(VENV)-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	{ echo "# Every transitive dependency of .[dev,bench], pinned: written by \`make lock\`, used by"; \
	  echo "# \`make venv\` (pip install -c constraints.txt). Edit pyproject.toml, then run make lock."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable --disable-pip-version-check \
	    | grep -v '^pip=='; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

bench: $(STAMP)
	$(VENV)/bin/replyx bench

check: $(STAMP)
	$(VENV)/bin/replyx check

clean:
	rm -rf $(VENV) $(LOCK_VENV) build *.egg-info
