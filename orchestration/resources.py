"""The resources the assets use (by key: `settings`, `s3`): the workspace and S3.

`settings` is the workspace: its params file (`load()` gives the validated config the CLI and DVC use too) and
its DVC repository (`record_version` gives a materialisation its data version and commits it to dvc.lock).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from llava_core.config import PipelineConfig
from llava_core.params import load_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_params_path() -> str:
    """`LLAVA_PARAMS` if set, else the project's params.yaml."""
    return os.environ.get("LLAVA_PARAMS", str(PROJECT_ROOT / "params.yaml"))


class PipelineSettings(dg.ConfigurableResource):
    """Where the params file is; `load()` gives the validated config (same one the CLI and DVC use).

    `dvc_commit`: record each materialisation in dvc.lock when the workspace is the DVC repository
    (orchestration/versioning.py); `dvc_remote`: also `dvc push` the stage's outputs to that remote (S3-backed).
    """

    params_path: str = default_params_path()
    dvc_commit: bool = True
    dvc_remote: str | None = None
    dvc_lock_timeout_s: float = 600.0

    def load(self) -> PipelineConfig:
        return load_config(self.params_path)

    def record_version(self, asset: str, result: dg.MaterializeResult) -> dg.MaterializeResult:
        """`result` with the DVC hash of the asset's output as data version, committed to dvc.lock."""
        from orchestration.versioning import record_version

        return record_version(result, asset, self)

    def register_model(self):
        """Register the evaluated model in the model registry (the `registry` section; orchestration/registry.py)."""
        from orchestration.registry import register

        return register(self.load(), self.params_path, self.dvc_lock_timeout_s)

    def commit_gate(self, dvc_stage: str) -> str:
        """Record a passed gate stage in dvc.lock; returns what happened (for the check's metadata)."""
        from orchestration.versioning import commit_gate

        return commit_gate(self, dvc_stage)


class S3Resource(dg.ConfigurableResource):
    """A boto3 S3 client with a configurable endpoint (MinIO, moto, AWS); secrets come in through `dg.EnvVar`.

    Unset fields fall back to boto3's own chain (environment, ~/.aws). An endpoint or region given to
    `client()` (a source's or the publish section's own setting) wins over the resource's.
    """

    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    max_attempts: int = 5

    def client(self, endpoint_url: str | None = None, region_name: str | None = None):
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(
            aws_access_key_id=self.aws_access_key_id, aws_secret_access_key=self.aws_secret_access_key
        )
        return session.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            region_name=region_name or self.region_name,
            config=Config(retries={"mode": "standard", "max_attempts": self.max_attempts}),
        )
