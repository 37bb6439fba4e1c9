"""Stage 1 assets: one `raw_<source>` asset per source declared in params.yaml."""

import dagster as dg

from llava_core.config import PipelineConfig
from llava_core.data.sources import download, source_state
from llava_core.pipeline import asset_inputs, stage
from llava_core.stage_guard import run_guarded

# Transfers fail for passing reasons (a dropped connection, a throttled endpoint): retry with backoff.
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
STAGE = stage("download")
SOURCE_TAG = "llava/source_state"  # what the source held when it was fetched (orchestration/retrain.py compares it)


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
            c = settings.load()
            state = source_state(c, source)  # before fetching: a change during the fetch shows on the next look
            r = run_guarded(STAGE, c, source, download, refetch=config.refetch)
            if r.skipped:  # the folder was kept: the source is as the last fetch found it, not necessarily as now
                state = previous_tag(context, name, SOURCE_TAG)
            metadata = {
                "path": dg.MetadataValue.path(str(r.path)),
                "kind": cfg.sources[source].kind,
                "files": r.files,
                "bytes": r.bytes,
                "skipped_unchanged": r.skipped,
            }
            tags = {SOURCE_TAG: source_tag(state)} if state else {}
            return settings.record_version(name, dg.MaterializeResult(metadata=metadata, tags=tags))

        return _raw

    return [make(s) for s in STAGE.keys(cfg)]


def source_tag(state: str) -> str:
    """A source state as a tag value (Dagster allows 63 characters): its first 128 bits."""
    return state[:32]


def previous_tag(context: dg.AssetExecutionContext, asset: str, tag: str) -> str | None:
    entry = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    return (entry.asset_materialization.tags or {}).get(tag) if entry and entry.asset_materialization else None
