"""Stage 1 assets: one `raw_<source>` asset per source declared in params.yaml."""

import dagster as dg

from llava_core.config import PipelineConfig
from llava_core.data.sources import download
from llava_core.pipeline import asset_inputs, stage

# Transfers fail for passing reasons (a dropped connection, a throttled endpoint): retry with backoff.
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
STAGE = stage("download")


class DownloadConfig(dg.Config):
    """`refetch`: fetch again although the folder is intact (set by the S3 sensor when the prefix changed)."""

    refetch: bool = False


def raw_key(source: str) -> dg.AssetKey:
    return dg.AssetKey(STAGE.asset_name(source))


def build_download_assets(
    cfg: PipelineConfig, retry_policy: dg.RetryPolicy = TRANSIENT_RETRY
) -> list[dg.AssetsDefinition]:
    def make(source: str) -> dg.AssetsDefinition:
        name = STAGE.asset_name(source)

        @dg.asset(
            key=name,
            deps=asset_inputs(cfg, STAGE, source),
            group_name="download",
            kinds={"python"},
            retry_policy=retry_policy,
            required_resource_keys={"settings"},
            description=f"Source `{source}` ({cfg.sources[source].kind}) in data/raw/{source}/ with its manifest.",
        )
        def _raw(context: dg.AssetExecutionContext, config: DownloadConfig) -> dg.MaterializeResult:
            settings = context.resources.settings
            r = download(settings.load(), source, refetch=config.refetch)
            metadata = {
                "path": dg.MetadataValue.path(str(r.path)),
                "kind": cfg.sources[source].kind,
                "files": r.files,
                "bytes": r.bytes,
                "skipped_unchanged": r.skipped,
            }
            return settings.record_version(name, dg.MaterializeResult(metadata=metadata))

        return _raw

    return [make(s) for s in STAGE.keys(cfg)]
