"""Stage 5 assets: `hf_model` (the phase-2 checkpoint converted to Hugging Face) and `eval_report`."""

from __future__ import annotations

import dagster as dg

from assets.download import raw_key
from assets.resources import PipelineSettings
from assets.train import checkpoint_key
from llava_core.checkpoint import export_hf
from llava_core.config import PipelineConfig
from llava_core.evaluate import evaluate


def build_evaluate_assets(cfg: PipelineConfig) -> list[dg.AssetsDefinition]:
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

    eval_source = cfg.eval.questions.split("/")[0]
    deps = [dg.AssetKey("hf_model")] + ([raw_key(eval_source)] if eval_source in cfg.sources else [])

    @dg.asset(
        key=dg.AssetKey("eval_report"),
        deps=deps,
        group_name="export",
        kinds={"json"},
        description="Greedy answers on the held-out questions, scored per category: reports/eval.json.",
    )
    def eval_report(settings: PipelineSettings) -> dg.MaterializeResult:
        r = evaluate(settings.load())
        rows = [
            {"category": c, "metric": m["metric"], "n": m["n"], "accuracy": round(m["accuracy"], 4)}
            for c, m in r.report["by_category"].items()
        ]
        meta = {
            "path": dg.MetadataValue.path(str(r.report_path)),
            "overall_accuracy": r.report["overall_accuracy"],
            "by_category": dg.MetadataValue.md(_table(rows)),
        }
        for c, m in r.report["by_category"].items():
            meta[f"accuracy/{c}"] = m["accuracy"]
        return dg.MaterializeResult(metadata=meta)

    return [hf_model, eval_report]


def _table(rows: list[dict]) -> str:
    head = "| category | metric | n | accuracy |\n|---|---|---|---|\n"
    return head + "".join(f"| {r['category']} | {r['metric']} | {r['n']} | {r['accuracy']} |\n" for r in rows)
