"""Stage 5a assets: the phase-2 checkpoint converted to Hugging Face (`hf_model`) and to the original LLaVA layout
(`llava_model`), and, when params.yaml has a `publish` section, their upload to S3 (`published_model`)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from assets.download import TRANSIENT_RETRY
from assets.resources import PipelineSettings, S3Resource
from assets.train import checkpoint_key
from assets.versioning import versioned
from llava_core.config import PipelineConfig


def training_metrics(checkpoint: Path) -> dict:
    """The metrics of the checkpoint a model was exported from (its train_summary.json), as metadata."""
    path = checkpoint / "train_summary.json"
    if not path.is_file():
        return {}
    s = json.loads(path.read_text())
    keys = ("steps", "first_loss", "final_loss", "examples", "trainable_parameters")
    return {f"train/{k}": s[k] for k in keys if isinstance(s.get(k), (int, float))}


def build_export_assets(
    cfg: PipelineConfig, retry_policy: dg.RetryPolicy = TRANSIENT_RETRY
) -> list[dg.AssetsDefinition]:
    @dg.asset(
        key=dg.AssetKey("hf_model"),
        deps=[checkpoint_key("phase2")],
        group_name="export",
        kinds={"huggingface"},
        description="LlavaForConditionalGeneration + processor in models/hf/.",
    )
    @versioned(dg.AssetKey("hf_model"))
    def hf_model(settings: PipelineSettings) -> dg.MaterializeResult:
        # torch: imported by the step that needs it, not by every process that loads the code location (assets/__init__)
        from llava_core.checkpoint import export_hf

        c = settings.load()
        r = export_hf(c)
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(r.path)),
                "parameters": r.parameters,
                "image_token_id": r.image_token_id,
                **training_metrics(c.checkpoint_dir("phase2")),
            }
        )

    @dg.asset(
        key=dg.AssetKey("llava_model"),
        deps=[checkpoint_key("phase2")],
        group_name="export",
        kinds={"pytorch"},
        description="The original LLaVA repository layout in models/llava/ (image_model/ + text_model_llava/).",
    )
    @versioned(dg.AssetKey("llava_model"))
    def llava_model(settings: PipelineSettings) -> dg.MaterializeResult:
        from llava_core.checkpoint import export_llava

        c = settings.load()
        r = export_llava(c)
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(r.path)),
                "parameters": r.parameters,
                "model_path": dg.MetadataValue.path(str(r.text_model)),
                "vision_tower": dg.MetadataValue.path(str(r.image_model)),
                **training_metrics(c.checkpoint_dir("phase2")),
            }
        )

    out = [hf_model, llava_model]
    if cfg.publish is not None:
        keys = {"hf": "hf_model", "llava": "llava_model"}

        @dg.asset(
            key=dg.AssetKey("published_model"),
            deps=[dg.AssetKey(keys[m]) for m in cfg.publish.models],
            group_name="export",
            kinds={"s3"},
            retry_policy=retry_policy,
            description=f"models/{{{','.join(cfg.publish.models)}}} uploaded to s3://{cfg.publish.bucket}/.",
        )
        def published_model(settings: PipelineSettings, s3: S3Resource) -> dg.MaterializeResult:
            from llava_core.publish import publish

            c = settings.load()
            r = publish(c, client=s3.client(c.publish.endpoint_url, c.publish.region))
            return dg.MaterializeResult(
                metadata={
                    "uris": dg.MetadataValue.md("\n".join(f"- {u}" for u in r.uris)),
                    "files": r.files,
                    "bytes": r.bytes,
                }
            )

        out.append(published_model)
    return out
