"""Stage 5 Dagster assets: the converted checkpoints, the S3 upload and the eval report, materialised on a real
(temporary) instance from a ready checkpoint; metrics arrive as metadata, one table per task."""

from __future__ import annotations

import json

import boto3
import dagster as dg

from assets.evaluate import build_evaluate_assets
from assets.export import build_export_assets
from llava_core.data.tokenizer import load_tokenizer
from llava_core.params import load_config
from orchestration.definitions import build_assets, build_definitions
from orchestration.resources import PipelineSettings, S3Resource
from tests.helpers_models import eval_workspace, write_checkpoint


def test_definitions_hold_both_converted_models():
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"hf_model", "llava_model", "eval_report"} <= keys
    assert "published_model" not in keys  # only with a publish section
    assert graph.get(dg.AssetKey("llava_model")).parent_keys == {dg.AssetKey("checkpoint_phase2")}
    assert dg.AssetKey("hf_model") in graph.get(dg.AssetKey("eval_report")).parent_keys


def test_materialize_exports_publish_and_report(tmp_path, s3_endpoint, aws_env):
    endpoint = s3_endpoint
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="models")
    params = eval_workspace(
        tmp_path / "ws", publish={"bucket": "models", "endpoint_url": endpoint, "models": ["hf", "llava"]}
    )
    cfg = load_config(params)
    write_checkpoint(cfg, load_tokenizer(cfg.resolve_file(cfg.model.tokenizer)))
    assets = [*build_export_assets(cfg), *build_evaluate_assets(cfg)]
    published = next(a for a in assets if a.key == dg.AssetKey("published_model"))
    assert published.asset_deps[dg.AssetKey("published_model")] == {
        dg.AssetKey("hf_model"),
        dg.AssetKey("llava_model"),
    }
    assert {a.key.to_user_string() for a in build_assets(cfg)} >= {"published_model", "llava_model"}
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        result = dg.materialize(
            assets,
            instance=instance,
            resources={"settings": PipelineSettings(params_path=str(params)), "s3": S3Resource()},
        )
    assert result.success
    mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
    assert set(mats) == {"hf_model", "llava_model", "published_model", "eval_report"}
    meta = {k: m.event_specific_data.materialization.metadata for k, m in mats.items()}

    assert meta["llava_model"]["model_path"].value.endswith("models/llava/text_model_llava")
    assert meta["published_model"]["files"].value > 0
    assert "s3://models/llava-pipeline/llava/" in meta["published_model"]["uris"].value

    report = json.loads((tmp_path / "ws/reports/eval.json").read_text())
    em = meta["eval_report"]
    assert em["overall_accuracy"].value == report["overall_accuracy"]
    assert em["num_questions"].value == 5
    for cat, m in report["by_category"].items():
        table = em[f"metrics/{cat}"]
        assert isinstance(table, dg.TableMetadataValue)
        values = {r.data["metric"]: r.data["value"] for r in table.records}
        expected = {f"{m['metric']}.{k}": v for k, v in m.items() if k not in ("metric", "n")}
        assert values == expected
        assert em[f"accuracy/{cat}"].value == m["accuracy"]
    pope = {r.data["metric"] for r in em["metrics/exists"].records}
    assert pope == {f"pope.{k}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
