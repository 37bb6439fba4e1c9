"""Stage 5a assets: the phase-2 checkpoint converted to Hugging Face (`hf_model`) and to the original LLaVA layout
(`llava_model`), and, when params.yaml has a `publish` section, their upload to S3 (`published_model`)."""

from __future__ import annotations

import dagster as dg

from assets.resources import PipelineSettings
from assets.train import checkpoint_key
from llava_core.checkpoint import export_hf, export_llava
from llava_core.config import PipelineConfig
from llava_core.publish import publish


def build_export_assets(cfg: PipelineConfig) -> list[dg.AssetsDefinition]:
    @dg.asset(
        key=dg.AssetKey("hf_model"),
        deps=[checkpoint_key("phase2")],
        group_name="export",
        kinds={"huggingface"},
        description="LlavaForConditionalGeneration + processor in models/hf/.",
    )
    def hf_model(settings: PipelineSettings) -> dg.MaterializeResult:
        r = export_hf(settings.load())
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(r.path)),
                "parameters": r.parameters,
                "image_token_id": r.image_token_id,
            }
        )

    @dg.asset(
        key=dg.AssetKey("llava_model"),
        deps=[checkpoint_key("phase2")],
        group_name="export",
        kinds={"pytorch"},
        description="The original LLaVA repository layout in models/llava/ (image_model/ + text_model_llava/).",
    )
    def llava_model(settings: PipelineSettings) -> dg.MaterializeResult:
        r = export_llava(settings.load())
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(r.path)),
                "parameters": r.parameters,
                "model_path": dg.MetadataValue.path(str(r.text_model)),
                "vision_tower": dg.MetadataValue.path(str(r.image_model)),
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
            description=f"models/{{{','.join(cfg.publish.models)}}} uploaded to s3://{cfg.publish.bucket}/.",
        )
        def published_model(settings: PipelineSettings) -> dg.MaterializeResult:
            r = publish(settings.load())
            return dg.MaterializeResult(
                metadata={
                    "uris": dg.MetadataValue.md("\n".join(f"- {u}" for u in r.uris)),
                    "files": r.files,
                    "bytes": r.bytes,
                }
            )

        out.append(published_model)
    return out
