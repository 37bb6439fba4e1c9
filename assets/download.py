"""Stage 1 assets: one `raw_<source>` asset per source declared in params.yaml."""

from __future__ import annotations

import dagster as dg

from assets.resources import PipelineSettings
from assets.versioning import versioned
from llava_core.config import PipelineConfig
from llava_core.sources import download

# Transfers fail for passing reasons (a dropped connection, a throttled endpoint): retry with backoff.
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


class DownloadConfig(dg.Config):
    """`refetch`: fetch again although the folder is intact (set by the S3 sensor when the prefix changed)."""

    refetch: bool = False


def raw_key(source: str) -> dg.AssetKey:
    return dg.AssetKey(f"raw_{source}")


def build_download_assets(
    cfg: PipelineConfig, retry_policy: dg.RetryPolicy = TRANSIENT_RETRY
) -> list[dg.AssetsDefinition]:
    def make(source: str) -> dg.AssetsDefinition:
        @dg.asset(
            key=raw_key(source),
            group_name="download",
            kinds={"python"},
            retry_policy=retry_policy,
            description=f"Source `{source}` ({cfg.sources[source].kind}) in data/raw/{source}/ with its manifest.",
        )
        @versioned(raw_key(source))
        def _raw(config: DownloadConfig, settings: PipelineSettings) -> dg.MaterializeResult:
            r = download(settings.load(), source, refetch=config.refetch)
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
