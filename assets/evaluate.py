"""Stage 5b asset: `eval_report` (reports/eval.json), with a metrics table per task as metadata, and its
`prompt_suffixes` check (severity WARN): it fails when a category was asked with a suffix under 1% of the
training questions carried (the report's `warnings`)."""

from pathlib import Path

import dagster as dg

from llava_core.artifacts import EVAL_PLOT
from llava_core.config import PipelineConfig
from llava_core.pipeline import asset_inputs, stage
from llava_core.plots import png_markdown
from llava_core.stage_guard import run_guarded

STAGE = stage("evaluate")


def build_evaluate_assets(cfg: PipelineConfig) -> list[dg.AssetsDefinition]:
    name = STAGE.asset_name(None)

    @dg.asset(
        key=name,
        deps=asset_inputs(cfg, STAGE, None),
        group_name="export",
        kinds={"json"},
        required_resource_keys={"settings"},
        description="Greedy answers on the held-out questions, scored per category: reports/eval.json.",
        check_specs=[
            dg.AssetCheckSpec(
                SUFFIX_CHECK,
                asset=name,
                description="Every category is asked with a suffix that at least 1% of the training questions carried.",
            )
        ],
    )
    def eval_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from llava_core.evaluation.evaluate import evaluate  # torch: imported by this step only (assets/__init__)

        settings = context.resources.settings
        r = run_guarded(STAGE, settings.load(), None, evaluate)
        result = dg.MaterializeResult(
            metadata=report_metadata(r.report, str(r.report_path)), check_results=[suffix_check(r.report)]
        )
        return settings.record_version(name, result)

    return [eval_report]


SUFFIX_CHECK = "prompt_suffixes"


def suffix_check(report: dict) -> dg.AssetCheckResult:
    """Passes when the report has no warnings; each category's suffix and training share as metadata."""
    warnings = report.get("warnings", [])
    by = report.get("prompt_suffix", {}).get("by_category", {})
    rows = "".join(f"| {c} | {e['suffix']} | {e['training_share']} |\n" for c, e in by.items())
    return dg.AssetCheckResult(
        check_name=SUFFIX_CHECK,
        passed=not warnings,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in warnings) or "none"),
            "suffixes": dg.MetadataValue.md("| category | suffix | training share |\n|---|---|---|\n" + rows),
        },
    )


METRIC_TABLE = dg.TableSchema(columns=[dg.TableColumn("metric", "string"), dg.TableColumn("value", "float")])


def report_metadata(report: dict, path: str) -> dict:
    """Overview table, one metrics table per task (`metrics/<task>`), the headline numbers as floats."""
    by = report["by_category"]
    rows = [
        {"category": c, "metric": m["metric"], "n": m["n"], "accuracy": round(m["accuracy"], 4)} for c, m in by.items()
    ]
    meta: dict = {
        "path": dg.MetadataValue.path(path),
        "num_questions": report["num_questions"],
        "overall_accuracy": report["overall_accuracy"],
        "by_category": dg.MetadataValue.md(_table(rows)),
    }
    picture = Path(path).with_name(EVAL_PLOT)
    if picture.is_file():  # drawn by the evaluation beside the report
        meta["scores_plot"] = dg.MetadataValue.md(png_markdown(picture.read_bytes(), "score per category"))
    for c, m in by.items():
        values = {k: v for k, v in m.items() if k not in ("metric", "n") and isinstance(v, (int, float))}
        meta[f"metrics/{c}"] = dg.MetadataValue.table(
            records=[dg.TableRecord({"metric": f"{m['metric']}.{k}", "value": float(v)}) for k, v in values.items()],
            schema=METRIC_TABLE,
        )
        meta[f"accuracy/{c}"] = m["accuracy"]
    judge = report.get("judge")
    if judge:
        meta["judge/relative_score"] = judge["overall"]["relative_score"]
        meta["judge/model"] = judge["model"]
    return meta


def _table(rows: list[dict]) -> str:
    head = "| category | metric | n | accuracy |\n|---|---|---|---|\n"
    return head + "".join(f"| {r['category']} | {r['metric']} | {r['n']} | {r['accuracy']} |\n" for r in rows)
