# One entry for setup, demo and tests. `make demo` / `make test` set everything up from nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel on our machines and CI; on a GPU box put the torch build you want here (or pre-install it).
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m jobs.train

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q
