"""Stage 1 assets: one `raw_<source>` asset per source declared in params.yaml."""

from __future__ import annotations

import dagster as dg

from assets.resources import PipelineSettings
from llava_core.config import PipelineConfig
from llava_core.sources import download


def raw_key(source: str) -> dg.AssetKey:
    return dg.AssetKey(f"raw_{source}")


def build_download_assets(cfg: PipelineConfig) -> list[dg.AssetsDefinition]:
    def make(source: str) -> dg.AssetsDefinition:
        @dg.asset(
            key=raw_key(source),
            group_name="download",
            kinds={"python"},
            description=f"Source `{source}` ({cfg.sources[source].kind}) in data/raw/{source}/ with its manifest.",
        )
        def _raw(settings: PipelineSettings) -> dg.MaterializeResult:
            r = download(settings.load(), source)
            return dg.MaterializeResult(
                metadata={
                    "path": dg.MetadataValue.path(str(r.path)),
                    "kind": cfg.sources[source].kind,
                    "files": r.files,
                    "bytes": r.bytes,
                    "skipped_unchanged": r.skipped,
                }
            )

        return _raw

    return [make(s) for s in cfg.sources]
