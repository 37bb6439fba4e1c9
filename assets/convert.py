"""Stage 2 assets: one `jsonl_<dataset>` asset per configured conversion, its report as metadata."""

import dagster as dg

from llava_core.config import PipelineConfig
from llava_core.data.convert import convert
from llava_core.pipeline import asset_inputs, stage
from llava_core.stage_guard import run_guarded

STAGE = stage("convert")


def build_convert_assets(cfg: PipelineConfig) -> list[dg.AssetsDefinition]:
    def make(dataset: str) -> dg.AssetsDefinition:
        ds, name = cfg.datasets[dataset], STAGE.asset_name(dataset)

        @dg.asset(
            key=name,
            deps=asset_inputs(cfg, STAGE, dataset),
            group_name="convert",
            kinds={"python"},
            required_resource_keys={"settings"},
            description=f"`{ds.file}` of `{ds.source}` through converter `{ds.converter}` -> "
            f"data/jsonl/{dataset}.jsonl ({ds.phase}).",
        )
        def _jsonl(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            settings = context.resources.settings
            r = run_guarded(STAGE, settings.load(), dataset, convert)
            metadata = {
                "path": dg.MetadataValue.path(str(r.path)),
                "report": dg.MetadataValue.path(str(r.report_path)),
                "converter": ds.converter,
                "read": r.read,
                "written": r.written,
                "dropped": sum(r.dropped.values()),
                "dropped_by_reason": dg.MetadataValue.json(r.dropped),
            }
            return settings.record_version(name, dg.MaterializeResult(metadata=metadata))

        return _jsonl

    return [make(d) for d in STAGE.keys(cfg)]
