# The few commands people type. `make demo` and `make test` set up the virtualenvs first.

# --- The environments (docs/install.md) ------------------------------------------------------------------------
# PY: the interpreter the virtualenvs are made from (3.11, 3.12 or 3.13), e.g. `make setup PY=python3.12`.
# ACCEL: the torch build: cpu, cuda (PyPI's CUDA build + DeepSpeed), or auto (cuda where `nvidia-smi -L` lists a GPU).
# WHEELS: a folder of wheels searched first for torch's CPU build (this project's machines carry it in /opt/wheels).
# DVC_VENV: DVC and GTO in their own environment; `dvc` and `gto` in $(VENV)/bin run them.
PY       ?= python3
ACCEL    ?= auto
WHEELS   ?= /opt/wheels
VENV     ?= .venv
DVC_VENV ?= .venv-dvc
VPY      := $(VENV)/bin/python
# Dagster's instance (run history, schedules) for `make demo` and `make dagster`. The UI listens on loopback only;
# DAGSTER_HOST=0.0.0.0 opens it to the network (behind your own auth proxy).
DAGSTER_HOME ?= $(CURDIR)/.dagster_home
DAGSTER_HOST ?= 127.0.0.1

# The base interpreter behind PY (also when PY is a venv's or pyenv's), and its version, for the stamp.
PY_INFO  := $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2], getattr(sys, "_base_executable", sys.executable))' 2>/dev/null)
PY_VER   := $(word 1,$(PY_INFO))
PYTHON   := $(word 2,$(PY_INFO))
ifeq ($(ACCEL),auto)
  ACCEL_BUILD := $(if $(shell nvidia-smi -L 2>/dev/null | grep '^GPU '),cuda,cpu)
else
  ACCEL_BUILD := $(ACCEL)
endif
ifeq ($(filter cpu cuda,$(ACCEL_BUILD)),)
  $(error ACCEL=$(ACCEL): choose cpu, cuda or auto)
endif
# One stamp per accelerator and Python: another ACCEL or PY re-runs the set-up (which swaps torch or remakes .venv).
STAMP    := $(VENV)/.installed-$(ACCEL_BUILD)-py$(PY_VER)

export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test test-all test-fast lint bench bench-scale lock dagster dvc-remote clean slurm-up slurm-down gpu-check

setup: $(STAMP)

# scripts/setup_env.py: uv pip sync of the lock (bytecode compiled: without the .pyc files every stage process, DVC
# stage and Dagster step compiles torch, transformers, dagster... again, 2-3x slower to start; docs/performance.md),
# the project (editable), the DVC tool environment and the `dvc`/`gto` commands in $(VENV)/bin; then the stamp (the
# other stamps go once the script starts changing the virtualenv: a refused set-up leaves the working one as it was).
$(STAMP): pyproject.toml requirements-$(ACCEL_BUILD).lock requirements-dvc.lock scripts/setup_env.py
	@$(if $(PYTHON),,echo "PY=$(PY): no such Python interpreter (3.11, 3.12 or 3.13 needed)" >&2; exit 2)
	$(PYTHON) scripts/setup_env.py --accel $(ACCEL_BUILD) --venv $(VENV) --dvc-venv $(DVC_VENV) --wheels $(WHEELS) \
	    --stamp $@

# The demo runs as the Dagster job llava_pipeline on make dagster's instance, so the UI shows its runs and assets
# (orchestration/launch.py); each asset records its stage in dvc.lock. `llava-pipeline all` runs the same stages
# without Dagster.
demo: setup $(DAGSTER_HOME)/dagster.yaml  ## the whole pipeline on the embedded default (in Dagster), then the eval report
	DAGSTER_HOME=$(DAGSTER_HOME) $(VPY) -m orchestration run

test: setup  ## the test suite (unit + end-to-end on the tiny preset, the SLURM cluster runs), without the `slow` ones
	$(VENV)/bin/pytest -q -m "not slow"

test-all: setup  ## everything: the full-size default pipeline's learning floors and the other transformers versions too
	$(VENV)/bin/pytest -q

test-fast: setup  ## unit tests only
	$(VENV)/bin/pytest -q -m "not e2e"

bench: setup  ## every benchmark, each figure beside its baseline from the same run: benchmarks/results/results.{json,md}
	$(VPY) -m benchmarks

bench-scale: setup  ## the data stages and the loader at 10k, 100k, 1M records (~30 min): benchmarks/results/scale.{json,md,png}
	nice -n 10 $(VPY) -m benchmarks --only scale $(if $(MAX_SIZE),--max-size $(MAX_SIZE))

lint: setup
	$(VENV)/bin/ruff check llava_core assets orchestration tests scripts benchmarks

# dvc.yaml is generated from the stage table, the code's imports and params.yaml (docs/dvc.md): regenerate it after
# adding a source or a dataset, or changing what a stage imports (tests/orchestration/test_dvc_yaml.py checks it).
dvc.yaml: params.yaml $(shell find llava_core -name '*.py') | $(STAMP)  ## dvc.yaml from the stage table and params
	$(VENV)/bin/llava-pipeline --params params.yaml dvc-yaml > $@.tmp && mv $@.tmp $@

# --- The locks ----------------------------------------------------------------------------------------------------
# Three locks, each universal over Python 3.11-3.13 (pyproject's requires-python): the main environment with PyPI's
# CUDA torch and DeepSpeed; the same tree with torch's CPU build, resolved from a copy of the cuda lock (its pins are
# uv's preferences, so every shared package keeps the cuda lock's version); the DVC tool environment (--no-config:
# pyproject's [tool.uv] settings are the main environment's). Pins already in a lock are kept where they still fit;
# UPGRADE=1 moves every pin to the newest release.
TORCH     := $(shell sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
TORCH_CPU := $(if $(wildcard $(WHEELS)/torch-$(TORCH)+cpu-*.whl),--find-links $(WHEELS),--torch-backend cpu)
LOCK_OPTS := --universal --python-version 3.11
UPGRADE_OPT := $(if $(UPGRADE),--upgrade,)

lock:  ## re-pin requirements-{cuda,cpu,dvc}.lock after changing pyproject.toml (docs/install.md)
	$(PYTHON) scripts/setup_env.py --accel cpu --venv $(VENV) --uv-only
	echo "torch==$(TORCH)+cpu" > $(VENV)/torch-cpu-build.txt
	export UV_CUSTOM_COMPILE_COMMAND="make lock"; set -e; \
	$(VENV)/bin/uv pip compile -q pyproject.toml --extra dev --extra cuda $(LOCK_OPTS) $(UPGRADE_OPT) -o requirements-cuda.lock; \
	cp requirements-cuda.lock requirements-cpu.lock; \
	$(VENV)/bin/uv pip compile -q pyproject.toml --extra dev $(LOCK_OPTS) $(TORCH_CPU) -c $(VENV)/torch-cpu-build.txt \
	    -o requirements-cpu.lock; \
	$(VENV)/bin/uv pip compile -q --no-config --group pyproject.toml:dvc $(LOCK_OPTS) $(UPGRADE_OPT) -o requirements-dvc.lock


dagster: setup $(DAGSTER_HOME)/dagster.yaml  ## the Dagster UI on http://127.0.0.1:3000 (run history in DAGSTER_HOME)
	DAGSTER_HOME=$(DAGSTER_HOME) $(VENV)/bin/dagster dev -h $(DAGSTER_HOST) -p 3000

# The instance settings (gpu pool limited to 1), refreshed when the committed template changes.
$(DAGSTER_HOME)/dagster.yaml: configs/dagster/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp $< $@

dvc-remote: setup  ## the DVC S3 remote: make dvc-remote URL=s3://bucket/prefix [ENDPOINT=http://host:9000] [REGION=...]
	$(DVC_VENV)/bin/python scripts/dvc_remote.py $(URL) $(if $(ENDPOINT),--endpoint $(ENDPOINT),) $(if $(REGION),--region $(REGION),)

# --- GPUs and clusters (docs/gpus-and-clusters.md) ---------------------------------------------------------------
# A one-machine SLURM cluster on loopback (root; Debian's munge, slurmctld, slurmd, slurm-client) in .slurm/;
# then `export SLURM_CONF=$(CURDIR)/.slurm/etc/slurm.conf` and set train.<phase>.launcher: slurm.
slurm-up:  ## start the loopback SLURM cluster (idempotent)
	python3 scripts/slurm_cluster.py up --dir .slurm

slurm-down:  ## stop it
	python3 scripts/slurm_cluster.py down --dir .slurm

# The GPU acceptance run (one CUDA GPU, at most 8 minutes): with the project's virtualenv if there is one, else the
# python3 that has torch, transformers, accelerate, h5py, peft and safetensors (no `make setup` needed).
GPU_PY ?= $(if $(wildcard $(VPY)),$(VPY),python3)
gpu-check:  ## both phases of a 1B LLaVA on one GPU, FSDP and ZeRO-2, export, evaluation: benchmarks/results/gpu.json
	$(GPU_PY) -m benchmarks.gpu_check

clean:  ## remove the workspace outputs (not the virtualenv)
	rm -rf data checkpoints models reports
