# One command each: `make demo` (train/test/predict on phantoms) and `make test`; both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps demo test test-fast lint clean

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

# Debian tools two tests use: Chromium opens report.html; dicom3tools' dciodvfy validates DICOM-SEG.
system-deps:
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v dciodvfy >/dev/null 2>&1 || missing="$$missing dicom3tools"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "install the Debian packages:$$missing (the report and DICOM-SEG tests need them)"; fi; \
	fi

test: install system-deps
	$(BIN)/python -m pytest -q -x --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check sautomed tests
	$(BIN)/ruff format --check sautomed tests

clean:
	rm -rf $(VENV) runs
