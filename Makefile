# The two commands of the README:
#   make demo   set up a virtual environment and run Moirai's main job on a bundled model
#   make test   set up (with test tools and the Kubernetes test control plane) and run every check
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRA ?= cpu

.PHONY: setup demo test lint controlplane

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRA),dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/moirai demo

controlplane:
	hack/controlplane/build.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup controlplane lint
	$(BIN)/pytest
