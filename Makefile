# The two set-up commands of the README: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test lint bench setup screenshots

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/backfill demo --yes

# Bytecode compiled first: the suite starts the CLI in hundreds of subprocesses, which otherwise
# compile every module again where PYTHONDONTWRITEBYTECODE is set (they still read it).
test: setup lint
	$(BIN)/python -m compileall -q -j 0 src tests
	$(BIN)/python -m pytest --durations=15

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/sqlite_bench.py

# The README's pictures, in Debian's chromium (apt-get install chromium), from the demo mid-run.
screenshots: setup
	$(BIN)/python scripts/screenshots.py
