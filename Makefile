# Two entry points (see README): `make run` and `make test`. Both set up .venv first, idempotently.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The main job: ResNet-50 on this machine with the default budget.
run: setup
	$(VENV)/bin/tune run --model resnet50 --target auto

# The whole suite, slow cases included (they run in a cheap form).
test: setup
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf artifacts runs mlruns mlflow.db test-artifacts
