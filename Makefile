# Two commands on a fresh machine: `make run` and `make test`. Everything else is set up on the way.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run test test-fast bench sweep clean lint stack stack-stop stack-status deploy cost-model official device-rehearsal

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[cpu,dev,export,tracking,cluster]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(BIN)/python -c "import torch, prefect, dvc, great_expectations, faiss, webdataset" || { echo "install failed" >&2; exit 1; }
	@touch $(STAMP)

setup: $(STAMP)
	@infra/setup-system.sh
	@test -d .dvc || $(BIN)/dvc init -q $$(git rev-parse --git-dir >/dev/null 2>&1 || echo --no-scm)

run: setup
	$(BIN)/dinov2-pipeline run

# One test process per core, at most 4 (pytest-xdist); a file's tests stay in one process, so a module's fixture (the
# stack, the training shards) is built once. Most tests wait on subprocesses, servers and I/O: on CI's 2 cores the
# suite takes about half the time it takes in one process. Files go out in collection order, which tests/conftest.py
# sets to the end-to-end files first (xdist's default order, most tests first, left them to run alone at the end).
PYTEST := $(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder --durations=15

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

bench: setup
	$(BIN)/python -m benchmarks

official:   # the official implementation's source, for the benchmarks' ratio against it (needs github.com)
	@test -d third_party/dinov2 || git clone -q --depth 1 https://github.com/facebookresearch/dinov2 third_party/dinov2

device-rehearsal: setup official   # the lent GPU's run (device bundle + command) on the CPU under its image's versions
	$(BIN)/python -m benchmarks.device_bundle
	$(BIN)/python -m benchmarks.device_rehearsal

sweep: setup   # the pretraining recipe sweep behind params.yaml (needs the shards: dvc repro shards)
	$(BIN)/dvc repro shards
	$(BIN)/python -m benchmarks.recipe_sweep

lint: setup
	$(BIN)/ruff check dinov2_core tasks flows tests benchmarks hubconf.py
	$(BIN)/dinov2-pipeline dvc-yaml --check

clean:
	rm -rf data reports/metrics reports/validation reports/plots .dvc/cache .dvc/tmp

# ---- operations (README "Operations"): local Prefect server + worker + S3-compatible store on 127.0.0.1 ----------
stack: setup
	@infra/stack.sh start

stack-stop:
	@infra/stack.sh stop

stack-status:
	@infra/stack.sh status

deploy: setup
	$(BIN)/dinov2-pipeline deploy

cost-model: setup
	@$(BIN)/python infra/cost_model.py
