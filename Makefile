# Quickstart: `make test` (and `make demo` once the demo model lands).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint bench clean

install: $(STAMP)

# Re-install only when the packaging files change.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check --line-length 120 --select E,F,W,I,B,UP --ignore B905 --target-version py310 indexer retrieval tests bench

bench: $(STAMP)
	$(PY) bench/index_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
