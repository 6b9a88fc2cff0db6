# The two commands of the README:
#   make demo   set up a virtual environment and run Moirai's main job on a bundled model
#   make test   set up (with test tools and the Kubernetes test control plane) and run every check
# and what they are made of: setup, lint, controlplane, image (Moirai's image, with Docker).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRA ?= cpu

.PHONY: setup demo test lint controlplane image

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

image:
	hack/image/build.sh cpu

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup controlplane lint
	$(BIN)/pytest
