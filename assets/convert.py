"""Stage 2 assets: one `jsonl_<dataset>` asset per configured conversion, its report as metadata."""

from __future__ import annotations

import dagster as dg

from assets.download import raw_key
from assets.resources import PipelineSettings
from assets.versioning import versioned
from llava_core.config import PipelineConfig
from llava_core.convert import convert


def jsonl_key(dataset: str) -> dg.AssetKey:
    return dg.AssetKey(f"jsonl_{dataset}")


def build_convert_assets(cfg: PipelineConfig) -> list[dg.AssetsDefinition]:
    def make(dataset: str) -> dg.AssetsDefinition:
        ds = cfg.datasets[dataset]

        @dg.asset(
            key=jsonl_key(dataset),
            deps=[raw_key(ds.source)],
            group_name="convert",
            kinds={"python"},
            description=f"`{ds.file}` of `{ds.source}` through converter `{ds.converter}` -> "
            f"data/jsonl/{dataset}.jsonl ({ds.phase}).",
        )
        @versioned(jsonl_key(dataset))
        def _jsonl(settings: PipelineSettings) -> dg.MaterializeResult:
            r = convert(settings.load(), dataset)
            return dg.MaterializeResult(
                metadata={
                    "path": dg.MetadataValue.path(str(r.path)),
                    "report": dg.MetadataValue.path(str(r.report_path)),
                    "converter": ds.converter,
                    "read": r.read,
                    "written": r.written,
                    "dropped": sum(r.dropped.values()),
                    "dropped_by_reason": dg.MetadataValue.json(r.dropped),
                }
            )

        return _jsonl

    return [make(d) for d in cfg.datasets]
