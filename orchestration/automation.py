"""Scheduled retrains and sensors: the weekly retrain, S3 source changes, and dvc.lock -> Dagster data versions.

All three are off until turned on in the UI (Automation) or with `dagster schedule start` / `dagster sensor
start`; their state lives in DAGSTER_HOME, so it survives restarts.
"""

from __future__ import annotations

import hashlib
import json
import os

import dagster as dg

from assets.download import raw_key
from llava_core.config import PipelineConfig
from llava_core.data.fetch import listing_digest, s3_source_objects
from orchestration.dvc import DvcRepo
from orchestration.resources import PipelineSettings, S3Resource
from orchestration.retrain import plan_retrain
from orchestration.versioning import latest_data_version, lock_sync_events

DEFAULT_RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00
TRIGGER_TAG = "llava/trigger"


def retrain_schedule(
    job: dg.UnresolvedAssetJobDefinition,
    cron: str | None = None,
    timezone: str | None = None,
    force: bool | None = None,
    all_assets: list[dg.AssetsDefinition] | None = None,
):
    """`weekly_retrain`: on a cron (`LLAVA_RETRAIN_CRON`, default Mondays 03:00, in `LLAVA_RETRAIN_TZ`, default UTC),
    one run of the assets whose source, settings or inputs changed and what derives from them, the changed
    sources fetched again (orchestration/retrain.py); nothing new: no run, the tick's skip reason says "up to
    date". `force` (`LLAVA_RETRAIN_FORCE=1`): every tick runs the whole job, every source fetched again."""
    cron = cron or os.environ.get("LLAVA_RETRAIN_CRON", DEFAULT_RETRAIN_CRON)
    timezone = timezone or os.environ.get("LLAVA_RETRAIN_TZ", "UTC")
    force = os.environ.get("LLAVA_RETRAIN_FORCE", "0") == "1" if force is None else force

    def weekly_retrain(
        context: dg.ScheduleEvaluationContext, settings: PipelineSettings, s3: S3Resource
    ) -> dg.RunRequest | dg.SkipReason:
        when = context.scheduled_execution_time
        plan = plan_retrain(
            settings.load(),
            context.instance,
            lambda src: s3.client(src.options.get("endpoint_url"), src.options.get("region")),
            force=force,
        )
        context.log.info(plan.summary())
        if not plan.reasons:
            return dg.SkipReason(plan.summary())
        keys = [dg.AssetKey(k) for k in plan.reasons]
        if all_assets:  # and what derives from them outside the stage table (published_model)
            keys = sorted(dg.AssetSelection.assets(*keys).downstream().resolve(all_assets), key=str)
        return dg.RunRequest(
            run_key=f"retrain-{when.isoformat()}",
            asset_selection=keys,
            run_config={
                "ops": {raw_key(s).to_python_identifier(): {"config": {"refetch": True}} for s in plan.refetch}
            },
            tags={
                TRIGGER_TAG: "schedule",
                "llava/scheduled_for": when.isoformat(),
                "llava/retrain": f"{len(plan.reasons)} of {plan.checked} assets" + (" (forced)" if force else ""),
            },
        )

    try:
        return dg.schedule(
            name="weekly_retrain",
            job=job,
            cron_schedule=cron,
            execution_timezone=timezone,
            default_status=dg.DefaultScheduleStatus.STOPPED,
            description=f"Runs what changed in `{job.name}` (download -> eval) on `{cron}` ({timezone}).",
        )(weekly_retrain)
    except dg.DagsterInvalidDefinitionError as e:
        raise ValueError(
            f"LLAVA_RETRAIN_CRON={cron!r}: not a valid schedule (e.g. {DEFAULT_RETRAIN_CRON!r}): {e}"
        ) from None


def s3_source_sensor(cfg: PipelineConfig, job, all_assets: list[dg.AssetsDefinition]) -> dg.SensorDefinition:
    """`s3_source_changed`: for each `kind: s3` source, lists its prefix; when the listing digest differs from
    the one in the cursor, one run of the source and everything downstream, the source fetched again.

    The first listing of a source is its baseline (no run); the cursor keeps one digest per source, so a
    change starts exactly one run, and a prefix that cannot be listed keeps its old digest (tried again)."""
    sources = {n: s for n, s in cfg.sources.items() if s.kind == "s3"}
    downstream = {
        n: sorted(dg.AssetSelection.assets(raw_key(n)).downstream().resolve(all_assets), key=str) for n in sources
    }
    interval = int(os.environ.get("LLAVA_S3_SENSOR_INTERVAL_S", "300"))

    @dg.sensor(
        name="s3_source_changed",
        job=job,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Re-runs a source and its downstream assets when objects under its S3 prefix change.",
    )
    def s3_source_changed(context: dg.SensorEvaluationContext, s3: S3Resource) -> dg.SensorResult:
        if not sources:
            return dg.SensorResult(skip_reason="no s3 sources in the params file")
        cursor = json.loads(context.cursor) if context.cursor else {}
        runs, notes = [], []
        for name, src in sources.items():
            client = s3.client(src.options.get("endpoint_url"), src.options.get("region"))
            try:
                digest = listing_digest(s3_source_objects(client, src.location, src.patterns))
            except Exception as e:  # one unreachable prefix must not hide the others' changes
                context.log.warning(f"{name}: cannot list {src.location}: {e}")
                notes.append(f"{name}: listing failed ({type(e).__name__})")
                continue
            previous = cursor.get(name)
            cursor[name] = digest
            if previous is None:
                notes.append(f"{name}: baseline recorded")
            elif previous != digest:
                runs.append(
                    dg.RunRequest(
                        run_key=f"{name}:{digest[:16]}",
                        asset_selection=downstream[name],
                        run_config={"ops": {raw_key(name).to_python_identifier(): {"config": {"refetch": True}}}},
                        tags={TRIGGER_TAG: "s3_source_changed", "llava/source": name},
                    )
                )
            else:
                notes.append(f"{name}: unchanged")
        if runs:
            return dg.SensorResult(run_requests=runs, cursor=json.dumps(cursor, sort_keys=True))
        return dg.SensorResult(skip_reason="; ".join(notes), cursor=json.dumps(cursor, sort_keys=True))

    return s3_source_changed


def dvc_lock_sensor(all_assets: list[dg.AssetsDefinition]) -> dg.SensorDefinition:
    """`dvc_lock_sync`: after `dvc repro` (or `dvc checkout`), records each asset whose dvc.lock hash is new to
    Dagster as materialised with that data version, so the asset graph shows what the workspace holds."""
    parents = {key: set(a.asset_deps[key]) for a in all_assets for key in a.keys}

    @dg.sensor(
        name="dvc_lock_sync",
        minimum_interval_seconds=int(os.environ.get("LLAVA_DVC_SENSOR_INTERVAL_S", "60")),
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Reports outputs that `dvc repro` produced as materialisations with their DVC hash.",
    )
    def dvc_lock_sync(context: dg.SensorEvaluationContext, settings: PipelineSettings) -> dg.SensorResult:
        cfg = settings.load()
        repo, why_not = DvcRepo.for_workspace(cfg, settings.params_path)
        if repo is None:
            return dg.SensorResult(skip_reason=why_not)
        lock = repo.root / "dvc.lock"
        if not lock.is_file():
            return dg.SensorResult(skip_reason="no dvc.lock yet")
        digest = hashlib.sha256(lock.read_bytes()).hexdigest()
        if context.cursor == digest:
            return dg.SensorResult(skip_reason="dvc.lock unchanged")
        sync = lock_sync_events(cfg, repo, lambda k: latest_data_version(context.instance, k), parents)
        for name, why in sync.skipped.items():
            context.log.info(f"{name}: {why}")
        if sync.differs:
            context.log.info(f"{sync.differs}: the workspace differs from dvc.lock (dvc repro running? dvc checkout?)")
        # a workspace that differs from dvc.lock (a repro still running) is looked at again on the next tick
        cursor = context.cursor if sync.differs else digest
        if sync.events:
            return dg.SensorResult(asset_events=sync.events, cursor=cursor)
        return dg.SensorResult(skip_reason=f"{len(sync.unchanged)} assets already at dvc.lock", cursor=cursor)

    return dvc_lock_sync
