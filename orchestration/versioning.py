"""Data versions shared by Dagster and DVC: each asset's data version is the DVC hash of its output.

When the workspace is the DVC repository (its root holds `dvc.yaml` and `.dvc/`, and the params file is its
`params.yaml`), each materialisation also runs `dvc commit -f <stage>`: the stage's entry in `dvc.lock` then
records the deps, params and outputs the asset just produced (the same stage function `dvc repro` runs, on the
same params file), so `dvc status` finds nothing to do. The other direction, `dvc repro` -> Dagster, is
`lock_sync_events`: a runless materialisation per asset whose `dvc.lock` hash differs from its last data
version, with the stage's dep hashes as the input data versions, so Dagster sees those assets as up to date.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg

from llava_core.atomic import json_text
from llava_core.config import PipelineConfig
from llava_core.pipeline import steps
from llava_core.stage_guard import read_record, settings_view
from orchestration.dvc import DvcIgnore, DvcRepo, commit, dvc_hash, dvc_stages, lock_hashes

# Dagster's tag names for the data version of a materialisation and the versions of its inputs (what
# `MaterializeResult(data_version=...)` writes; a runless event carries them itself).
DATA_VERSION_TAG = "dagster/data_version"
DATA_VERSION_IS_USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"
CODE_VERSION_TAG = "dagster/code_version"
# Ours: what the retrain planner (orchestration/retrain.py) compares with the present
SETTINGS_TAG = "llava/settings"  # digest of the settings the stage read


def input_tags(parent: dg.AssetKey, version: str) -> dict[str, str]:
    name = parent.to_user_string()
    return {f"dagster/input_data_version/{name}": version, f"dagster/input_event_pointer/{name}": "NULL"}


def latest_data_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    entry = instance.get_latest_materialization_event(key)
    materialization = entry.asset_materialization if entry else None
    return (materialization.tags or {}).get(DATA_VERSION_TAG) if materialization else None


def record_version(result: dg.MaterializeResult, asset: str, settings) -> dg.MaterializeResult:
    """The asset's result plus its DVC hash as data version, output size and count, and its dvc.lock entry."""
    cfg = settings.load()
    stage = dvc_stages(cfg)[asset]
    ignore = DvcIgnore(cfg.root.resolve())
    hashes = [dvc_hash(p, ignore) for p in stage.outs]
    primary = hashes[0]
    meta: dict = {
        "dvc_stage": stage.name,
        "dvc_md5": primary.md5,
        "output_path": dg.MetadataValue.path(str(stage.outs[0])),
        "output_bytes": primary.bytes,
        "output_files": primary.files,
    }
    for p, h in zip(stage.outs[1:], hashes[1:], strict=True):
        meta[f"dvc_md5/{p.name}"] = h.md5
    repo, why_not = DvcRepo.for_workspace(cfg, settings.params_path, settings.dvc_lock_timeout_s)
    if repo is None or not settings.dvc_commit:
        meta["dvc_lock"] = why_not or "dvc commit turned off (settings.dvc_commit)"
    else:
        commit(repo, stage, hashes)
        meta["dvc_lock"] = f"committed ({repo.root / 'dvc.lock'})"
        if settings.dvc_remote:
            repo.run("push", "--quiet", "--remote", settings.dvc_remote, stage.name)
            meta["dvc_remote"] = settings.dvc_remote
    made = read_record(stage.outs[0])
    if made:  # the run that made it: this one, or another that this one waited for (llava_core/stage_guard.py)
        meta["made_by"] = f"pid {made['pid']} on {made['host']} at {made['finished']}"
    return dg.MaterializeResult(
        asset_key=result.asset_key,
        metadata={**(result.metadata or {}), **meta},
        check_results=result.check_results,
        data_version=dg.DataVersion(primary.md5),
        tags={**(result.tags or {}), SETTINGS_TAG: settings_digest(cfg, asset)},
        value=result.value,
    )


def settings_digest(cfg: PipelineConfig, asset: str) -> str:
    """A digest of the settings the asset's stage reads (the params sections DVC lists for it)."""
    s, key = asset_steps(cfg)[asset]
    return hashlib.sha256(json_text(settings_view(cfg, s, key)).encode()).hexdigest()[:16]


def asset_steps(cfg: PipelineConfig) -> dict[str, tuple]:
    """Asset name -> the (stage, key) that materialises it."""
    return {s.asset_name(k): (s, k) for s, k in steps(cfg) if s.asset is not None}


def commit_gate(settings, stage_name: str) -> str:
    """Record a gate stage (`validate_<phase>`, no asset of its own: a Dagster asset check) in dvc.lock after
    it ran in Dagster, so `dvc status` agrees; returns what happened, for the check's metadata."""
    cfg = settings.load()
    repo, why_not = DvcRepo.for_workspace(cfg, settings.params_path, settings.dvc_lock_timeout_s)
    if repo is None or not settings.dvc_commit:
        return why_not or "dvc commit turned off (settings.dvc_commit)"
    repo.run("commit", "--force", "--quiet", stage_name)
    return f"committed ({repo.root / 'dvc.lock'})"


# --- dvc repro -> Dagster -----------------------------------------------------------------------------------
@dataclass
class LockSync:
    events: list[dg.AssetMaterialization]
    unchanged: list[str]  # asset keys whose last data version already equals dvc.lock
    skipped: dict[str, str]  # asset key -> why no event: the stage or its output is not in dvc.lock
    differs: list[str]  # asset keys whose output in the workspace is not what dvc.lock records


def lock_sync_events(
    cfg: PipelineConfig, repo: DvcRepo, latest: Callable[[dg.AssetKey], str | None], parents: dict
) -> LockSync:
    """A materialisation for each asset whose dvc.lock hash differs from its latest data version (`latest`),
    when the workspace holds exactly what dvc.lock says; the stage's dep hashes become its input versions."""
    stages = {dg.AssetKey(name): stage for name, stage in dvc_stages(cfg).items()}
    lock = repo.lock_stages()
    ignore = DvcIgnore(repo.root)
    sync = LockSync([], [], {}, [])
    for key, stage in stages.items():
        name = key.to_user_string()
        entry = lock.get(stage.name)
        if entry is None:
            sync.skipped[name] = f"no {stage.name} stage in dvc.lock"
            continue
        primary = repo.rel(stage.outs[0])
        md5 = lock_hashes(entry, "outs").get(primary)
        if md5 is None:
            sync.skipped[name] = f"dvc.lock's {stage.name} has no hash for {primary}"
            continue
        if latest(key) == md5:
            sync.unchanged.append(name)
            continue
        if not stage.outs[0].exists() or dvc_hash(stage.outs[0], ignore).md5 != md5:
            sync.differs.append(name)
            continue
        deps = lock_hashes(entry, "deps")
        tags = {
            DATA_VERSION_TAG: md5,
            DATA_VERSION_IS_USER_PROVIDED_TAG: "true",
            CODE_VERSION_TAG: f"dvc.lock:{stage.name}",
        }
        for parent in parents.get(key, ()):
            parent_stage = stages.get(parent)
            dep = deps.get(repo.rel(parent_stage.outs[0])) if parent_stage else None
            if dep is not None:
                tags.update(input_tags(parent, dep))
        meta = {
            "dvc_stage": stage.name,
            "dvc_md5": md5,
            "output_path": dg.MetadataValue.path(str(stage.outs[0])),
            "source": "dvc.lock (dvc repro or dvc checkout)",
        }
        sync.events.append(dg.AssetMaterialization(asset_key=key, metadata=meta, tags=tags))
    return sync
