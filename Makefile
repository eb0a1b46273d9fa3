# Two entry points (see README): `make run` and `make test`. Both set up .venv first, idempotently.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser run test test-fast clean

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

# The whole suite, slow cases included (they run in a cheap form).
test: setup browser
	$(VENV)/bin/pytest -q

test-fast: setup browser
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf artifacts runs mlruns mlflow.db test-artifacts
