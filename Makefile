# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.p2pcompute-installed

.PHONY: demo demo-swarm test lint typecheck unit bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# The main job: a bootstrap node and three peer processes train a small model with DiLoCo;
# one peer is killed midway and a new one joins (about a minute on 2 quiet cores).
demo: $(STAMP)
	$(PY) -m demos.diloco

# The overlay alone: a bootstrap node and three peers print each other's capacity.
demo-swarm: $(STAMP)
	$(PY) -m demos.swarm

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(PY) -m benchmarks all

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .hypothesis
