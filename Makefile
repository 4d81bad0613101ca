# The two commands: `make run` (the whole stack with a demo) and `make test` (the whole suite).
# Both create .venv and install requirements.txt when needed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test test-fast bench drills install services-start services-stop services-status clean

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
		{ echo "AgentManager needs Python 3.11 or newer; run e.g. 'make run PYTHON=python3.12'."; exit 1; }
	@test -x $(PY) || { echo "[am] Creating $(VENV)..."; $(PYTHON) -m venv $(VENV); }
	@echo "[am] Installing requirements.txt into $(VENV) (first time: a minute or two)..."
	@$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@$(PY) -m am_project.stack

test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the tests marked slow (live servers, subprocesses, timed waits): the loop while editing.
test-fast: $(STAMP)
	@$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	@$(PY) bench/goals.py
	@$(PY) bench/cpu_split.py
	@$(PY) bench/dispatch.py
	@$(PY) bench/scaling.py
	@$(PY) bench/history.py
	@$(PY) bench/locks.py
	@$(PY) bench/live.py
	@$(PY) bench/footprint.py
	@$(PY) bench/workspace.py

# Failure drills: each on private PostgreSQL and Redis it may stop (RELIABILITY.md).
drills: $(STAMP)
	@$(PY) drills/run.py $(DRILLS_ARGS)

services-start: $(STAMP)
	@$(PY) -m am_project.embedded start

services-stop: $(STAMP)
	@$(PY) -m am_project.embedded stop

services-status: $(STAMP)
	@$(PY) -m am_project.embedded status
