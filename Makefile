# One command each: `make demo` (train/test/predict on phantoms) and `make test`; both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

# torch first, pinned to the CPU build on disk: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -c "import sautomed.cli, sautomed.models.sam.upstream, lightning, SimpleITK, medpy, loralib; print('sautomed installed')"
	touch $(STAMP)

demo: install
	$(BIN)/python -m sautomed.demo

test: install
	$(BIN)/python -m pytest -q -x --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check sautomed tests
	$(BIN)/ruff format --check sautomed tests

clean:
	rm -rf $(VENV) runs
