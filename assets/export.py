"""Stage 5a assets: the final checkpoint converted to Hugging Face (`hf_model`) and to the original LLaVA layout
(`llava_model`), and, when params.yaml has a `publish` section, their upload to S3 (`published_model`)."""

import json
from pathlib import Path

import dagster as dg

from assets.download import TRANSIENT_RETRY
from llava_core.artifacts import TRAIN_SUMMARY
from llava_core.config import PipelineConfig
from llava_core.phases import FINAL_PHASE
from llava_core.pipeline import asset_inputs, stage
from llava_core.stage_guard import run_guarded

HF, LLAVA = stage("export_hf"), stage("export_llava")


def training_metrics(checkpoint: Path) -> dict:
    """The metrics of the checkpoint a model was exported from (its train_summary.json), as metadata."""
    path = checkpoint / TRAIN_SUMMARY
    if not path.is_file():
        return {}
    s = json.loads(path.read_text())
    keys = ("steps", "first_loss", "final_loss", "examples", "trainable_parameters")
    return {f"train/{k}": s[k] for k in keys if isinstance(s.get(k), (int, float))}


def build_export_assets(
    cfg: PipelineConfig, retry_policy: dg.RetryPolicy = TRANSIENT_RETRY
) -> list[dg.AssetsDefinition]:
    @dg.asset(
        key=HF.asset_name(None),
        deps=asset_inputs(cfg, HF, None),
        group_name="export",
        kinds={"huggingface"},
        required_resource_keys={"settings"},
        description="LlavaForConditionalGeneration + processor in models/hf/.",
    )
    def hf_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        # torch: imported by the step that needs it, not by every process that loads the code location (assets/__init__)
        from llava_core.model.hf import export_hf

        settings = context.resources.settings
        c = settings.load()
        r = run_guarded(HF, c, None, export_hf)
        metadata = {
            "path": dg.MetadataValue.path(str(r.path)),
            "parameters": r.parameters,
            "image_token_id": r.image_token_id,
            **training_metrics(c.checkpoint_dir(FINAL_PHASE)),
        }
        return settings.record_version(HF.asset_name(None), dg.MaterializeResult(metadata=metadata))

    @dg.asset(
        key=LLAVA.asset_name(None),
        deps=asset_inputs(cfg, LLAVA, None),
        group_name="export",
        kinds={"pytorch"},
        required_resource_keys={"settings"},
        description="The original LLaVA repository layout in models/llava/ (image_model/ + text_model_llava/).",
    )
    def llava_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from llava_core.model.original import export_llava

        settings = context.resources.settings
        c = settings.load()
        r = run_guarded(LLAVA, c, None, export_llava)
        metadata = {
            "path": dg.MetadataValue.path(str(r.path)),
            "parameters": r.parameters,
            "model_path": dg.MetadataValue.path(str(r.text_model)),
            "vision_tower": dg.MetadataValue.path(str(r.image_model)),
            **training_metrics(c.checkpoint_dir(FINAL_PHASE)),
        }
        return settings.record_version(LLAVA.asset_name(None), dg.MaterializeResult(metadata=metadata))

    out = [hf_model, llava_model]
    if cfg.publish is not None:
        keys = {"hf": HF.asset_name(None), "llava": LLAVA.asset_name(None)}

        @dg.asset(
            key=dg.AssetKey("published_model"),
            deps=[dg.AssetKey(keys[m]) for m in cfg.publish.models],
            group_name="export",
            kinds={"s3"},
            retry_policy=retry_policy,
            required_resource_keys={"settings", "s3"},
            description=f"models/{{{','.join(cfg.publish.models)}}} uploaded to s3://{cfg.publish.bucket}/.",
        )
        def published_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            from llava_core.model.publish import publish

            c = context.resources.settings.load()
            r = publish(c, client=context.resources.s3.client(c.publish.endpoint_url, c.publish.region))
            return dg.MaterializeResult(
                metadata={
                    "uris": dg.MetadataValue.md("\n".join(f"- {u}" for u in r.uris)),
                    "files": r.files,
                    "bytes": r.bytes,
                }
            )

        out.append(published_model)
    return out
