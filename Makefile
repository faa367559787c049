# Two entry points for a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench bench-latency sysdeps rundeps install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages, installed only when missing: apertium + apertium-eng-spa (offline translation, used
# by `make run` when no translation API key is set) and, for the tests, espeak-ng (speech fixtures),
# chromium (the agent console in a real browser, driven by Playwright; never `playwright install`) and
# nginx (the front of several nodes, tests/deploy/: run by deploy/local.py as a non-root process; the
# package's own service is never started).
APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq

rundeps:
	@dpkg -s apertium apertium-eng-spa >/dev/null 2>&1 || { \
	  echo "installing apertium apertium-eng-spa"; $(APT_INSTALL) apertium apertium-eng-spa >/dev/null; }

sysdeps: rundeps
	@command -v espeak-ng >/dev/null 2>&1 || { echo "installing espeak-ng"; $(APT_INSTALL) espeak-ng >/dev/null; }
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium"; $(APT_INSTALL) chromium >/dev/null; }
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { echo "installing nginx"; $(APT_INSTALL) nginx >/dev/null; }

run: $(STAMP) rundeps
	$(BIN)/switchboard serve --host 127.0.0.1 --port 8080 --demo

test: $(STAMP) sysdeps
	$(BIN)/ruff check engine api pipelines storage bench tests deploy
	$(BIN)/mypy engine
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest -q -x --durations=10

bench: $(STAMP) sysdeps
	$(BIN)/python -m bench.capacity

bench-latency: $(STAMP) sysdeps
	$(BIN)/switchboard bench latency --calls 1,10,50 --json bench-latency.json --plot bench-latency.png

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
