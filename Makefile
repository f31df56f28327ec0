# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.p2pcompute-installed

.PHONY: demo demo-diloco demo-swarm test lint typecheck unit bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# The main job: a researcher rents GPUs from five provider processes (one cheats), trains a small
# language model on them, catches the cheater, survives a SIGKILLed worker and verifies every ledger.
demo: $(STAMP)
	$(PY) -m demos.rent

# Peers that all run the same script train together with DiLoCo; one is killed, one joins.
demo-diloco: $(STAMP)
	$(PY) -m demos.diloco

# The overlay alone: a bootstrap node and three peers print each other's capacity.
demo-swarm: $(STAMP)
	$(PY) -m demos.swarm

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Two workers (PYTEST_WORKERS=0 runs the suite in one process, e.g. to debug a test).
PYTEST_WORKERS ?= 2
unit: $(STAMP)
	$(VENV)/bin/pytest -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup)

test: lint typecheck unit

bench: $(STAMP)
	$(PY) -m benchmarks all

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .hypothesis
