"""The resource every asset uses to get the resolved pipeline configuration."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from llava_core.config import PipelineConfig, load_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_params_path() -> str:
    """`LLAVA_PARAMS` if set, else the project's params.yaml."""
    return os.environ.get("LLAVA_PARAMS", str(PROJECT_ROOT / "params.yaml"))


class PipelineSettings(dg.ConfigurableResource):
    """Where the params file is; `load()` gives the validated config (same one the CLI and DVC use)."""

    params_path: str = default_params_path()

    def load(self) -> PipelineConfig:
        return load_config(self.params_path)
