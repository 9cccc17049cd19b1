# The commands people type. `make run` and `make test` are the README's two commands.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data/customers.csv
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# The exact, tested versions of everything `.[dev]` needs (`make lock` regenerates it from pyproject.toml).
LOCK := requirements.lock
# uv installs from the lock (seconds where pip takes minutes); its own version comes from the lock too.
UV := $(BIN)/uv
UV_VERSION = $(shell sed -n 's/^uv==//p' $(LOCK))
# uv's cache and the venv may sit on different file systems: copy instead of trying hard links first.
export UV_LINK_MODE ?= copy

.PHONY: setup run train serve test test-unit lint format bench ui clean

# Create .venv in the repository root and install custseg with every extra the tests use, at the lock's
# versions (from PyPI). Without uv the same install is: pip install -c requirements.lock -e ".[dev]".
# The install compiles custseg/scoring/_forest.c, _quickscorer.c and _treeshap.c (forest and explanation
# kernels) with the C compiler, and every installed module to bytecode: without that, a process started
# where bytecode is not written (PYTHONDONTWRITEBYTECODE, a read-only venv) compiles pandas, MLflow and
# the rest from source each time (3-5 s of CPU for every `custseg` command, server worker and test).
$(STAMP): pyproject.toml setup.py custseg/scoring/_forest.c custseg/scoring/_quickscorer.c \
		custseg/scoring/_treeshap.c $(LOCK) | $(UV)
	$(UV) pip install --python $(BIN)/python --quiet --compile-bytecode -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

$(UV):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (or run: make PYTHON=python3 ...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"

setup: $(STAMP)

# Re-resolve the lock from pyproject.toml's ranges for Python 3.11 on Linux x86-64 (the machines custseg is
# tested and deployed on). Pins that still fit are kept; `make lock UPGRADE=1` moves all to the newest allowed.
# Then copy changed runtime pins into deploy/azureml/environment.yml (tests/test_dependencies.py checks).
.PHONY: lock
lock: | $(UV)
	$(UV) pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu --custom-compile-command "make lock" \
		$(if $(UPGRADE),--upgrade) --quiet -o $(LOCK)

# Set up, train on the bundled sample, register in MLflow (alias champion if it is the best so far), serve.
run: setup train serve

train: setup
	$(BIN)/custseg train --data $(DATA)

serve: setup
	$(BIN)/custseg serve --host $(HOST) --port $(PORT)

# Unit and integration tests (PostgreSQL, an mlflow server, azmlinfsrv, Spark, `custseg serve`, chromium).
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tests only: no services, no network, under 90 s (tests/unit).
test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check custseg tests bench deploy
	$(BIN)/ruff format --check custseg tests bench deploy
	$(BIN)/mypy custseg
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff format custseg tests bench deploy
	$(BIN)/ruff check --fix custseg tests bench deploy

# Every benchmark (tens of minutes); each prints ours, its baseline from the same run, and the ratio.
bench: setup
	@command -v wrk >/dev/null || { echo "bench_api needs wrk: apt-get install -y wrk"; exit 1; }
	$(BIN)/python bench/bench_generate.py --rows 10000000
	$(BIN)/python bench/bench_quality.py
	$(BIN)/python bench/bench_inspect.py
	$(BIN)/python bench/bench_drift_false_alarms.py
	$(BIN)/python bench/bench_batch.py
	$(BIN)/python bench/bench_api.py

# The docs site (docs/ + mkdocs.yml; tools/gen_docs.py generates the CLI, configuration and HTTP API pages).
.PHONY: docs
docs: setup
	$(BIN)/mkdocs build --strict -d site

ui: setup
	$(BIN)/custseg ui

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache custseg.egg-info build custseg/scoring/_forest*.so
