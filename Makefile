# Warden: developer entry points. `make run` starts the whole stack; `make test` runs
# the whole test suite. Targets are not written to be run in parallel (-j).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful install; reinstall when pyproject.toml or the lock is newer.
STAMP := $(VENV)/.warden-installed

.PHONY: venv lock run test lint bench faults install-wrk install-promtool clean check-python

check-python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "error: $(PYTHON) not found on PATH; Warden needs Python 3.11 or newer" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || { \
	  echo "error: $$($(PYTHON) --version 2>&1) is too old; Warden needs Python 3.11 or newer" \
	       "(set PYTHON=python3.11 or newer)" >&2; exit 1; }

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock | check-python
	@if [ ! -x $(BIN)/python ]; then \
	  echo "creating $(VENV) with $$($(PYTHON) --version)"; \
	  $(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/python -m pip install --disable-pip-version-check -q -c requirements.lock \
	  -e '.[dev,embedded]'
	@touch $(STAMP)

# Re-pin requirements.lock to what the venv has (after a dependency change in pyproject.toml:
# edit the bounds, `pip install -e '.[dev,embedded]'` into the venv, then `make lock`).
lock: venv
	@{ sed -n '1,3p' requirements.lock; \
	  $(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check | sort -f; \
	} > requirements.lock.new && mv requirements.lock.new requirements.lock

run: venv
	$(BIN)/warden dev

# promtool (Debian's prometheus package) checks and unit-tests the alert rules
# (tests/deploy/test_observability.py); installed first when missing.
test: venv
	@command -v promtool >/dev/null 2>&1 || $(MAKE) --no-print-directory install-promtool || true
	$(BIN)/pytest tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy libs services/gateway services/filter-worker services/moderator services/webhooks bench

# The /sign benchmark (bench/harness.py; knobs BENCH_* there). Needs wrk: installed with
# apt-get when missing; without it the harness falls back to a Python load generator.
bench: venv
	@command -v wrk >/dev/null 2>&1 || $(MAKE) --no-print-directory install-wrk
	$(BIN)/python -m bench

# The fault suite (tests/faults/, also run by `make test` with one round) with a longer
# run: every fault kind WARDEN_FAULTS_ROUNDS times (default 3); prints the figures table
# (README "Reliability") and writes it to .warden/faults.md. Other knobs:
# WARDEN_FAULTS_SEED, WARDEN_FAULTS_RATE (see tests/faults/test_faults_under_load.py).
faults: venv
	@mkdir -p .warden
	WARDEN_FAULTS_ROUNDS=$${WARDEN_FAULTS_ROUNDS:-3} WARDEN_FAULTS_REPORT=.warden/faults.md \
	  $(BIN)/pytest -q -s -p no:cacheprovider tests/faults/test_faults_under_load.py

install-wrk:
	@if command -v apt-get >/dev/null 2>&1; then \
	  echo "installing wrk with apt-get"; \
	  apt-get install -y -qq wrk >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wrk >/dev/null 2>&1; } \
	    || echo "warning: could not install wrk; the Python load generator will be used" >&2; \
	else \
	  echo "warning: no apt-get to install wrk; the Python load generator will be used" >&2; \
	fi

# promtool for the alert rule tests; the tests fail (they never skip) without it.
install-promtool:
	@if command -v apt-get >/dev/null 2>&1; then \
	  echo "installing promtool (Debian's prometheus package) with apt-get"; \
	  apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 \
	         && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } \
	    || { echo "error: could not install promtool (apt-get install prometheus)" >&2; exit 1; }; \
	else \
	  echo "error: no apt-get to install promtool; install Prometheus' promtool on PATH" >&2; \
	  exit 1; \
	fi

# Removes local state (embedded servers' data, dev keys) and caches; keeps the venv.
# Stop `make run` first: removing a live server's data directory breaks it.
clean:
	@if [ -L .warden/pg/data ]; then rm -rf "$$(readlink .warden/pg/data)"; fi
	rm -rf .warden .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
