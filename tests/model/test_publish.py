"""Upload of converted models to S3, against a real S3 endpoint on loopback (moto in server mode)."""

from __future__ import annotations

import hashlib
import json

import boto3
import pytest

from llava_core.data.tokenizer import load_tokenizer
from llava_core.model.hf import export_hf
from llava_core.model.original import export_llava
from llava_core.model.publish import publish
from tests.helpers_models import eval_config, write_checkpoint


def test_publish_uploads_each_model_with_a_manifest(tmp_path, s3_endpoint, aws_env):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="models")
    cfg = eval_config(
        tmp_path,
        publish={"bucket": "models", "prefix": "runs/7", "endpoint_url": s3_endpoint, "models": ["hf", "llava"]},
    )
    write_checkpoint(cfg, load_tokenizer(cfg.resolve_file(cfg.model.tokenizer)))
    export_hf(cfg)
    export_llava(cfg)
    result = publish(cfg)
    assert result.uris == ["s3://models/runs/7/hf/", "s3://models/runs/7/llava/"]
    for name in ("hf", "llava"):
        folder = cfg.path("models") / name
        local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        listed = s3.list_objects_v2(Bucket="models", Prefix=f"runs/7/{name}/")["Contents"]
        remote = sorted(o["Key"][len(f"runs/7/{name}/") :] for o in listed)
        assert remote == sorted([*local, "manifest.json"])
        manifest = json.loads(s3.get_object(Bucket="models", Key=f"runs/7/{name}/manifest.json")["Body"].read())
        assert [m["path"] for m in manifest["files"]] == local
        for m in manifest["files"]:
            body = s3.get_object(Bucket="models", Key=f"runs/7/{name}/{m['path']}")["Body"].read()
            assert len(body) == m["bytes"] and hashlib.sha256(body).hexdigest() == m["sha256"]
    assert "text_model_llava/model.safetensors.index.json" in [
        m["path"]
        for m in json.loads(s3.get_object(Bucket="models", Key="runs/7/llava/manifest.json")["Body"].read())["files"]
    ]
    assert result.files == sum(1 for n in ("hf", "llava") for p in (cfg.path("models") / n).rglob("*") if p.is_file())


def test_publish_needs_the_export_and_the_section(tmp_path, s3_endpoint, aws_env):
    cfg = eval_config(tmp_path, publish={"bucket": "models", "endpoint_url": s3_endpoint})
    with pytest.raises(FileNotFoundError, match="models/hf holds no converted model"):
        publish(cfg)
    cfg = eval_config(tmp_path / "other")
    with pytest.raises(ValueError, match="no publish section"):
        publish(cfg)


def test_publish_config_is_validated(tmp_path):
    from llava_core.config import ConfigError

    with pytest.raises(ConfigError, match=r"publish\.models\.0: Input should be 'hf' or 'llava' \(got 'onnx'\)"):
        eval_config(tmp_path, publish={"bucket": "b", "models": ["onnx"]})
    with pytest.raises(
        ConfigError, match=r"publish: unknown key 'acl'; valid: bucket, prefix, endpoint_url, region, models"
    ):
        eval_config(tmp_path, publish={"bucket": "b", "acl": "public"})
