"""Stages 1-2 through Dagster: an S3 source (loopback moto server) and its DVQA conversion, report as metadata."""

from __future__ import annotations

import io
import json
import uuid

import boto3
import dagster as dg

from assets.convert import build_convert_assets
from assets.download import build_download_assets
from llava_core.params import load_config
from orchestration.resources import PipelineSettings
from tests.helpers_unit import base_params, png_bytes, write_params


def test_s3_source_and_dvqa_conversion_materialise(tmp_path, s3_endpoint, aws_env):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"dvqa-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    qa = [
        {"question_id": 1, "image": "bar.png", "question": "Which bar is tallest?", "answer": "cat"},
        {"question_id": 2, "image": "gone.png", "question": "Which bar is shortest?", "answer": "dog"},
    ]
    objects = {"DVQA/qa/train_qa.json": json.dumps(qa).encode(), "DVQA/images/bar.png": png_bytes()}
    for key, data in objects.items():
        client.upload_fileobj(io.BytesIO(data), bucket, key)

    params = base_params(tmp_path / "ws")
    params["sources"] = {
        "dvqa_src": {"kind": "s3", "location": f"s3://{bucket}/DVQA", "options": {"endpoint_url": s3_endpoint}}
    }
    params["datasets"] = {
        "dvqa": {"source": "dvqa_src", "file": "qa/train_qa.json", "converter": "dvqa", "phase": "phase2"}
    }
    path = write_params(tmp_path, params)
    cfg = load_config(path)
    assets = [*build_download_assets(cfg), *build_convert_assets(cfg)]
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            assets, instance=instance, resources={"settings": PipelineSettings(params_path=str(path))}
        )
    assert result.success
    mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
    meta = {k: m.event_specific_data.materialization.metadata for k, m in mats.items()}
    assert meta["raw_dvqa_src"]["kind"].value == "s3" and meta["raw_dvqa_src"]["files"].value == 2
    assert meta["jsonl_dvqa"]["written"].value == 1
    assert meta["jsonl_dvqa"]["dropped_by_reason"].value == {"image_missing": 1}
    raw = cfg.raw_dir("dvqa_src")
    for key, data in objects.items():
        assert (raw / key.removeprefix("DVQA/")).read_bytes() == data
    out = [json.loads(line) for line in cfg.jsonl_path("dvqa").read_text().splitlines()]
    assert out == [
        {
            "id": "dvqa-1",
            "image": "dvqa_src/images/bar.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhich bar is tallest?"},
                {"from": "gpt", "value": "cat"},
            ],
        }
    ]
