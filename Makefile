# Two entry points (see README): `make run` and `make test`. Both set up .venv first, idempotently.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser cross-tools postgres run test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The main job: ResNet-50 on this machine with the quick budget (the CLI default).
run: setup
	$(VENV)/bin/tune run --model resnet50 --target auto

# Debian's chromium for the browser check (tests/test_ui.py), when we may install system packages;
# without it that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; } || \
	  echo "chromium not installed: tests/test_ui.py will skip"; }

# Debian's aarch64 cross toolchain, for exports to ARM presets (`tune run --target aarch64-*`) and
# tests/test_cross.py, when we may install system packages; without it those tests skip and say why.
cross-tools:
	@command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu >/dev/null 2>&1; }; } || \
	  echo "g++-aarch64-linux-gnu not installed: aarch64 exports fail and tests/test_cross.py skips"; }

# Debian's PostgreSQL for the --tuning-db and MLflow-on-PostgreSQL tests (tests/pg.py starts a
# throwaway cluster from it), when we may install system packages; without it those tests skip.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1; }; } || \
	  echo "postgresql not installed: the PostgreSQL tests will skip"; }

# The whole suite, slow cases included (they run in a cheap form).
test: setup browser cross-tools postgres
	$(VENV)/bin/pytest -q

test-fast: setup browser cross-tools postgres
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf artifacts runs mlruns mlflow.db test-artifacts
