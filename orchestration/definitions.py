"""The Dagster code location: every stage as assets with lineage, jobs, the retrain schedule and the sensors.

Loaded by `dagster dev` (see [tool.dagster] in pyproject.toml). The per-source and per-dataset assets are
built from the params file named by `LLAVA_PARAMS` (default: the project's params.yaml); `LLAVA_ENV` picks the
resources (`local` or `s3`, see `build_resources`).
"""

from __future__ import annotations

import os

import dagster as dg

from assets.convert import build_convert_assets
from assets.download import build_download_assets
from assets.evaluate import build_evaluate_assets
from assets.export import build_export_assets
from assets.hdf5 import build_hdf5_assets, build_hdf5_checks
from assets.registry import build_registry_assets
from assets.train import build_train_assets
from llava_core.config import PipelineConfig
from llava_core.params import load_config
from orchestration.automation import dvc_lock_sensor, retrain_schedule, s3_source_sensor
from orchestration.resources import PipelineSettings, S3Resource, default_params_path

ENVIRONMENTS = ("local", "s3")
# What each step process needs imported before it starts. A step process forks from a server that imported these
# once per run (forkserver), instead of a fresh interpreter importing Dagster, this code location and its stage's
# libraries each time (spawn, Dagster's default): on 2 cores that cost 4-10 s per step (docs/performance.md).
# The server only imports: no torch op runs and no thread starts in it before it forks.
STEP_PRELOAD = [
    "dagster._core.executor.multiprocess",  # Dagster's own advice: first
    "orchestration.definitions",  # this code location (and Dagster)
    "llava_core.data.hdf5_writer", "llava_core.data.tokenizer", "llava_core.model.llava",  # hdf5 stages (transformers, torch)
    "llava_core.data.validate", "great_expectations",  # the gates
    "llava_core.model.hf", "llava_core.model.original", "llava_core.evaluation.evaluate",  # exports, evaluation
]  # fmt: skip
EXECUTORS = {
    "multiprocess": dg.multiprocess_executor.configured(
        {"start_method": {"forkserver": {"preload_modules": STEP_PRELOAD}}}, name="multiprocess_forkserver"
    ),
    "multiprocess_spawn": dg.multiprocess_executor,  # a fresh interpreter per step (when a library minds forking)
    "in_process": dg.in_process_executor,
}


def build_assets(cfg: PipelineConfig) -> list[dg.AssetsDefinition]:
    return [
        *build_download_assets(cfg),
        *build_convert_assets(cfg),
        *build_hdf5_assets(cfg),
        *build_train_assets(cfg),
        *build_export_assets(cfg),
        *build_evaluate_assets(cfg),
        *build_registry_assets(cfg),  # only with a `registry` section in params.yaml
    ]


def build_checks(cfg: PipelineConfig) -> list[dg.AssetChecksDefinition]:
    """The blocking data gates (Great Expectations) on the hdf5 assets."""
    return build_hdf5_checks(cfg)


def build_resources(params_path: str, env: str | None = None) -> dict:
    """The resources for an environment (`LLAVA_ENV`):

    - `local` (default): the workspace on this machine, outputs committed to the local DVC cache and
      dvc.lock; S3 (sources, sensor, publish) with boto3's own credentials, `LLAVA_S3_ENDPOINT_URL` if set.
    - `s3`: the same, plus every stage's outputs pushed to the DVC remote `LLAVA_DVC_REMOTE` (default
      `storage`, an S3 remote: `make dvc-remote`); S3 credentials from `AWS_ACCESS_KEY_ID` and
      `AWS_SECRET_ACCESS_KEY`, read at run time through `dg.EnvVar` (never stored in the definitions).
    """
    env = env or os.environ.get("LLAVA_ENV", "local")
    endpoint = os.environ.get("LLAVA_S3_ENDPOINT_URL") or None
    region = os.environ.get("AWS_DEFAULT_REGION") or None
    if env == "local":
        return {
            "settings": PipelineSettings(params_path=params_path),
            "s3": S3Resource(endpoint_url=endpoint, region_name=region),
        }
    if env == "s3":
        return {
            "settings": PipelineSettings(
                params_path=params_path, dvc_remote=os.environ.get("LLAVA_DVC_REMOTE", "storage")
            ),
            "s3": S3Resource(
                endpoint_url=endpoint,
                region_name=region,
                aws_access_key_id=dg.EnvVar("AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=dg.EnvVar("AWS_SECRET_ACCESS_KEY"),
            ),
        }
    raise ValueError(f"LLAVA_ENV={env!r}: unknown environment; valid: {list(ENVIRONMENTS)}")


def build_jobs() -> dict[str, dg.UnresolvedAssetJobDefinition]:
    return {
        "llava_data": dg.define_asset_job(
            "llava_data",
            selection=dg.AssetSelection.groups("download", "convert", "hdf5"),
            description="Data only: download -> convert -> hdf5.",
        ),
        "llava_train": dg.define_asset_job(
            "llava_train",
            selection=dg.AssetSelection.groups("train", "export"),
            description="Training from the existing HDF5 data, and what derives from it: both phases, the "
            "exports and the eval report.",
        ),
        "llava_pipeline": dg.define_asset_job(
            "llava_pipeline",
            selection=dg.AssetSelection.all(),
            description="Everything: download -> convert -> hdf5 -> train -> export -> eval.",
        ),
    }


def build_executor(name: str | None = None) -> dg.ExecutorDefinition:
    """`LLAVA_EXECUTOR`: `multiprocess` (default: a process per step, forked from a server holding the stages'
    imports, independent steps in parallel), `multiprocess_spawn` (a fresh interpreter per step) or `in_process`
    (every step in the run's process; training still runs in its own `accelerate launch` process)."""
    name = name or os.environ.get("LLAVA_EXECUTOR", "multiprocess")
    if name not in EXECUTORS:
        raise ValueError(f"LLAVA_EXECUTOR={name!r}: unknown executor; valid: {sorted(EXECUTORS)}")
    return EXECUTORS[name]


def build_definitions(params_path: str | None = None, env: str | None = None) -> dg.Definitions:
    params_path = params_path or default_params_path()
    cfg = load_config(params_path)
    all_assets = build_assets(cfg)
    jobs = build_jobs()
    full = jobs["llava_pipeline"]
    return dg.Definitions(
        assets=all_assets,
        asset_checks=build_checks(cfg),
        jobs=list(jobs.values()),
        schedules=[retrain_schedule(full, all_assets=all_assets)],
        sensors=[s3_source_sensor(cfg, full, all_assets), dvc_lock_sensor(all_assets)],
        resources=build_resources(params_path, env),
        executor=build_executor(),
    )


defs = build_definitions()
