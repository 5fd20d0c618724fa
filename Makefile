# Two commands on a fresh machine: `make demo` and `make test` (both run `make setup` first).
PYTHON     ?= python3
VENV       ?= .venv
# CPU build by default (a plain `pip install torch` can pull a multi-GB CUDA build).
# GPU machines: make setup TORCH_SPEC='torch==2.13.0+cu128' PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
WORK       ?= work
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.metarec-installed

.PHONY: setup setup-browser demo test test-fast test-all lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	{ cat constraints.txt; echo "$(TORCH_SPEC)"; } > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c $(VENV)/constraints.txt "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -c $(VENV)/constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/metarec prepare --config configs/demo.yaml --out $(WORK)/demo-data
	$(BIN)/metarec train --config configs/demo.yaml --data $(WORK)/demo-data --workers 2 \
		--work-dir $(WORK)
	$(BIN)/metarec evaluate --data $(WORK)/demo-data --work-dir $(WORK) --out $(WORK)/demo-eval \
		--model "$$($(BIN)/python -c 'import json; print(json.load(open("$(WORK)/last_run.json"))["model_uri"])')"
	@echo "MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(WORK))/mlflow.db"

# One pytest process per core; a test file stays in one process (its module fixtures, a
# local Ray or server, are built once). Most of an integration test is waiting on process
# start-up and Ray's polls, so two at once share the two cores well.
test: setup
	$(if $(filter true,$(CI)),$(MAKE) setup-browser)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

# Debian's Chromium for the page's browser test (Playwright drives it; it never downloads a
# browser of its own). CI installs it before `make test`; elsewhere the test skips without it.
setup-browser:
	@command -v chromium >/dev/null || { \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get install -y -q chromium || { $$sudo apt-get update -q && $$sudo apt-get install -y -q chromium; }; }
	@chromium --version

# Unit tests only: no Ray, servers or subprocesses; one pytest process per core.
test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow and not integration"

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/meta_step.py

clean:
	rm -rf $(VENV) $(WORK) .pytest_cache
