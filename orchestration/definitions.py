"""The Dagster code location: every stage as assets with lineage, and a job that materialises them all.

Loaded by `dagster dev` (see [tool.dagster] in pyproject.toml). The per-source and per-dataset assets are
built from the params file named by `LLAVA_PARAMS` (default: the project's params.yaml).
"""

from __future__ import annotations

import dagster as dg

from assets.convert import build_convert_assets
from assets.download import build_download_assets
from assets.evaluate import build_evaluate_assets
from assets.export import build_export_assets
from assets.hdf5 import build_hdf5_assets, build_hdf5_checks
from assets.resources import PipelineSettings, default_params_path
from assets.train import build_train_assets
from llava_core.config import PipelineConfig, load_config


def build_assets(cfg: PipelineConfig) -> list[dg.AssetsDefinition]:
    return [
        *build_download_assets(cfg),
        *build_convert_assets(cfg),
        *build_hdf5_assets(cfg),
        *build_train_assets(),
        *build_export_assets(cfg),
        *build_evaluate_assets(cfg),
    ]


def build_checks(cfg: PipelineConfig) -> list[dg.AssetChecksDefinition]:
    """The blocking data gates (Great Expectations) on the hdf5 assets."""
    return build_hdf5_checks(cfg)


def build_definitions(params_path: str | None = None) -> dg.Definitions:
    params_path = params_path or default_params_path()
    cfg = load_config(params_path)
    all_assets = build_assets(cfg)
    full = dg.define_asset_job(
        "llava_pipeline",
        selection=dg.AssetSelection.all(),
        description="Everything: download -> convert -> hdf5 -> train -> export -> eval.",
    )
    return dg.Definitions(
        assets=all_assets,
        asset_checks=build_checks(cfg),
        jobs=[full],
        resources={"settings": PipelineSettings(params_path=params_path)},
    )


defs = build_definitions()
