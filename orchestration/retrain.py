"""What a scheduled retrain runs: the assets whose source, settings or inputs changed since their last
materialisation, and everything that derives from them; nothing when nothing changed.

Each materialisation records, as tags, the data versions of its inputs (Dagster's own), the digest of the settings
its stage read (`llava/settings`, the params sections dvc.yaml lists for the stage) and, for a download, what its
source held when it was fetched (`llava/source_state`: a local folder's files, an S3 prefix's listing). The plan
compares each with the present, cheaply (no data is read or hashed): a tick with nothing new takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from assets.download import SOURCE_TAG, source_tag
from llava_core.config import PipelineConfig
from llava_core.data.sources import source_state
from llava_core.pipeline import asset_inputs, steps
from orchestration.versioning import SETTINGS_TAG, latest_data_version, settings_digest

INPUT_VERSION_TAG = "dagster/input_data_version/{}"


@dataclass
class RetrainPlan:
    """The assets to materialise, in dependency order, each with why; the sources to fetch again."""

    reasons: dict[str, str] = field(default_factory=dict)
    refetch: list[str] = field(default_factory=list)
    checked: int = 0

    def summary(self) -> str:
        if not self.reasons:
            return f"up to date: no source, setting or input of the {self.checked} assets changed since they were made"
        return f"{len(self.reasons)} of {self.checked} assets to materialise: " + "; ".join(
            f"{k} ({why})" for k, why in self.reasons.items()
        )


def plan_retrain(
    cfg: PipelineConfig, instance: dg.DagsterInstance, s3_client: Callable[[Any], Any] | None = None, force=False
) -> RetrainPlan:
    """The plan of a retrain on `instance`; `s3_client(source_config)` lists S3 sources; `force`: everything."""
    plan = RetrainPlan()
    for s, key in steps(cfg):
        if s.asset is None:  # a gate: an asset check, run with the asset it checks
            continue
        name = s.asset_name(key)
        plan.checked += 1
        why = "forced (force: true)" if force else _why(cfg, instance, s, key, plan, s3_client)
        if why:
            plan.reasons[name] = why
            if s.name == "download" and (force or why.startswith("source")):
                plan.refetch.append(key)
    return plan


def _why(cfg: PipelineConfig, instance, s, key, plan: RetrainPlan, s3_client) -> str | None:
    """Why the asset of (stage `s`, `key`) must be materialised again, or None when it is current."""
    name = s.asset_name(key)
    parents = asset_inputs(cfg, s, key)
    upstream = [p for p in parents if p in plan.reasons]
    if upstream:
        return f"{', '.join(upstream)} runs first"
    entry = instance.get_latest_materialization_event(dg.AssetKey(name))
    mat = entry.asset_materialization if entry else None
    if mat is None:
        return "never materialised"
    tags = mat.tags or {}
    out = s.outs(cfg, key)[0]
    if not out.exists():
        return f"its output {cfg.rel(out)} is missing"
    if tags.get(SETTINGS_TAG) != settings_digest(cfg, name):
        return "settings changed" if SETTINGS_TAG in tags else "settings not recorded (made outside a Dagster run)"
    if s.name == "download":
        src = cfg.sources[key]
        state = source_state(cfg, key, s3_client(src) if s3_client and src.kind == "s3" else None)
        if state is not None and tags.get(SOURCE_TAG) != source_tag(state):
            return f"source changed ({src.kind} {src.location})"
    for parent in parents:
        now = latest_data_version(instance, dg.AssetKey(parent))
        if tags.get(INPUT_VERSION_TAG.format(parent)) != now:
            return f"input {parent} changed since (now {now})"
    return None
