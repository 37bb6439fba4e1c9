"""Optional upload of the converted models to S3 (boto3; the endpoint is configurable, credentials come from
the environment as boto3 finds them).

Each model folder goes to `s3://<bucket>/<prefix>/<model>/...`; its `manifest.json` (every file with size and
sha256) is uploaded last, so a reader that finds the manifest knows the upload is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llava_core.artifacts import EXPORT_INFO, MANIFEST, file_manifest
from llava_core.config import PipelineConfig, PublishConfig


@dataclass
class PublishResult:
    bucket: str
    uris: list[str]  # s3://bucket/prefix/<model>/ per model
    files: int
    bytes: int


def s3_client(pc: PublishConfig):
    import boto3

    return boto3.client("s3", endpoint_url=pc.endpoint_url, region_name=pc.region)


def upload_folder(client, folder: Path, bucket: str, prefix: str) -> tuple[int, int]:
    """Upload every file under `folder` to `prefix/`, then `prefix/manifest.json`; returns (files, bytes)."""
    manifest = file_manifest(folder, exclude=())
    for entry in manifest:
        client.upload_file(str(folder / entry["path"]), bucket, f"{prefix}/{entry['path']}")
    body = json.dumps({"files": manifest}, indent=2).encode()
    client.put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=body, ContentType="application/json")
    return len(manifest), sum(m["bytes"] for m in manifest)


def publish(cfg: PipelineConfig, client=None) -> PublishResult:
    """Upload `models/<name>/` for each name in `publish.models`."""
    pc = cfg.publish
    if pc is None:
        raise ValueError("no publish section in the params file: nothing says where to upload the models")
    client = client or s3_client(pc)
    uris, files, size = [], 0, 0
    for name in pc.models:
        folder = cfg.path("models") / name
        if not (folder / EXPORT_INFO).is_file():
            raise FileNotFoundError(f"{folder} holds no converted model: run the export for {name!r} first")
        prefix = f"{pc.prefix.strip('/')}/{name}" if pc.prefix.strip("/") else name
        n, b = upload_folder(client, folder, pc.bucket, prefix)
        uris.append(f"s3://{pc.bucket}/{prefix}/")
        files += n
        size += b
    return PublishResult(pc.bucket, uris, files, size)
