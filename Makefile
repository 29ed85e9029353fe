# Two commands do all set-up on a fresh machine:
#   make test   create .venv, install, lint, run the test suite
#   make demo   create .venv, install, generate the demo set, run A->E, write the report
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SETTINGS ?= settings/demo.json
PYTEST_ARGS ?=

.PHONY: venv test test-all lint demo run bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .

test: venv lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the default suite plus the slow fault-injection loop
test-all: venv lint
	$(BIN)/python -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

demo: venv
	@$(BIN)/python datasets/demo.py --out data/demo
	@$(BIN)/python bow_pipeline/run_all.py settings/demo.json

run: venv
	$(BIN)/python bow_pipeline/run_all.py $(SETTINGS)

clean:
	rm -rf runs/demo data/demo
