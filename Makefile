# kn_dist: two commands for a new user — `make demo` and `make test`. Both set up from nothing.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo lint format clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/kn-dist demo

lint: setup
	$(VENV)/bin/ruff check kn_dist tests
	$(VENV)/bin/ruff format --check kn_dist tests

format: setup
	$(VENV)/bin/ruff format kn_dist tests
	$(VENV)/bin/ruff check --fix kn_dist tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
