# The few commands people type. `make demo` and `make test` set up the virtualenv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Machines of this project carry a CPU build of torch in /opt/wheels; elsewhere PyPI's build is used.
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test test-fast lint bench lock dagster dvc-remote clean

setup: $(VENV)/.installed

# --compile-bytecode: what pip does by default and uv does not. Without the .pyc files every process compiles
# torch, transformers, dagster... again (PYTHONDONTWRITEBYTECODE or a read-only venv): 2-3x slower start of each
# stage process, DVC stage and Dagster step (docs/performance.md).
$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==0.13.9
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -r requirements.lock $(WHEELS)
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e .
	touch $@

demo: setup  ## the whole pipeline on the embedded default, then the eval report
	$(VENV)/bin/llava-pipeline --params params.yaml all

test: setup  ## the full test suite (unit + end-to-end on the tiny preset)
	$(VENV)/bin/pytest -q

test-fast: setup  ## unit tests only
	$(VENV)/bin/pytest -q -m "not e2e"

bench: setup  ## every benchmark, each figure beside its baseline from the same run: benchmarks/results/results.{json,md}
	$(PY) -m benchmarks

lint: setup
	$(VENV)/bin/ruff check llava_core assets orchestration tests scripts benchmarks

lock:  ## re-pin the whole dependency tree after changing pyproject.toml (torch stays the +cpu build)
	rm -f requirements.lock.new
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 $(WHEELS) --no-header -o requirements.lock.new
	mv requirements.lock.new requirements.lock


DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# The UI listens on loopback only; DAGSTER_HOST=0.0.0.0 opens it to the network (behind your own auth proxy).
DAGSTER_HOST ?= 127.0.0.1

dagster: setup $(DAGSTER_HOME)/dagster.yaml  ## the Dagster UI on http://127.0.0.1:3000 (run history in DAGSTER_HOME)
	DAGSTER_HOME=$(DAGSTER_HOME) $(VENV)/bin/dagster dev -h $(DAGSTER_HOST) -p 3000

# The instance settings (gpu pool limited to 1), refreshed when the committed template changes.
$(DAGSTER_HOME)/dagster.yaml: configs/dagster/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp $< $@

dvc-remote: setup  ## the DVC S3 remote: make dvc-remote URL=s3://bucket/prefix [ENDPOINT=http://host:9000] [REGION=...]
	$(PY) scripts/dvc_remote.py $(URL) $(if $(ENDPOINT),--endpoint $(ENDPOINT),) $(if $(REGION),--region $(REGION),)

clean:  ## remove the workspace outputs (not the virtualenv)
	rm -rf data checkpoints models reports
