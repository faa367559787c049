# Two entry points for a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench sysdeps install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests need: espeak-ng (speech fixtures). Installed only when missing.
sysdeps:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  echo "installing espeak-ng"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng >/dev/null; }

run: $(STAMP)
	$(BIN)/switchboard serve --host 127.0.0.1 --port 8080

test: $(STAMP) sysdeps
	$(BIN)/ruff check engine api pipelines storage bench tests
	$(BIN)/mypy engine
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest -q -x --durations=10

bench: $(STAMP) sysdeps
	$(BIN)/python -m bench.capacity

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
