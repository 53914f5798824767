# LMForge developer commands. Everything installs into ./.venv (created on first use).
#
#   make demo    install, start the embedded stack, train a model over HTTP, sample from it
#   make test    install the development extras and run the test suite
#   make lint    ruff, mypy, hadolint (Dockerfile) and dclint (docker-compose.yml)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# dclint (https://github.com/zavoloklom/docker-compose-linter), run through npx when npm exists.
DCLINT_VERSION := 3.1.0

.DEFAULT_GOAL := help
.PHONY: help demo test lint lint-python lint-docker lint-dockerfile lint-compose clean

help:
	@echo "make demo    - train a small language model end to end over HTTP (1-2 minutes)"
	@echo "make test    - run the test suite"
	@echo "make lint    - ruff, mypy, hadolint, dclint"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.installed-embedded: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[embedded]'
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@ $(VENV)/.installed-embedded

demo: $(VENV)/.installed-embedded
	$(BIN)/python scripts/demo.py

# pytest exits 5 when nothing was collected (e.g. PYTEST_ARGS="-k nothing"): not a failure.
test: $(VENV)/.installed-dev
	@rc=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

lint: lint-python lint-docker

lint-python: $(VENV)/.installed-dev
	$(BIN)/ruff check core store app worker lmforge migrations tests scripts bench
	$(BIN)/mypy core store app worker lmforge migrations tests

lint-docker: lint-dockerfile lint-compose

lint-dockerfile: $(VENV)/.installed-dev
	$(BIN)/hadolint Dockerfile

lint-compose:
	@if command -v npx >/dev/null 2>&1; then \
		npx --yes dclint@$(DCLINT_VERSION) docker-compose.yml; \
	else \
		echo "npx not found: skipping dclint (install Node.js to validate docker-compose.yml)"; \
	fi

clean:
	rm -rf var/demo .pytest_cache .mypy_cache .ruff_cache
