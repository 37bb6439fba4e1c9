"""Stage 3 assets: `hdf5_phase1` and `hdf5_phase2`, built from the jsonl datasets of each phase, and their
blocking Great Expectations checks (`jsonl_suite`, `hdf5_suite`): training does not start after a failure."""

from __future__ import annotations

import dagster as dg

from assets.convert import jsonl_key
from assets.resources import PipelineSettings
from assets.versioning import commit_gate, versioned
from llava_core.config import PHASES, PipelineConfig
from llava_core.hdf5 import build_hdf5

SUITES = ("jsonl", "hdf5")


def hdf5_key(phase: str) -> dg.AssetKey:
    return dg.AssetKey(f"hdf5_{phase}")


def build_hdf5_assets(cfg: PipelineConfig) -> list[dg.AssetsDefinition]:
    def make(phase: str) -> dg.AssetsDefinition:
        @dg.asset(
            key=hdf5_key(phase),
            deps=[jsonl_key(d) for d in cfg.datasets_for(phase)],
            group_name="hdf5",
            kinds={"hdf5"},
            description=f"Tokenised {phase} examples with image slots and loss masks.",
        )
        @versioned(hdf5_key(phase))
        def _hdf5(settings: PipelineSettings) -> dg.MaterializeResult:
            r = build_hdf5(settings.load(), phase)
            return dg.MaterializeResult(
                metadata={
                    "path": dg.MetadataValue.path(str(r.path)),
                    "examples": r.examples,
                    "processed": r.processed,
                    "files": r.files,
                    "discarded_by_reason": dg.MetadataValue.json(r.discarded),
                    "image_notes": dg.MetadataValue.json(r.image_notes),
                    "image_start_idx": r.image_start_idx,
                }
            )

        return _hdf5

    return [make(p) for p in PHASES]


def build_hdf5_checks(cfg: PipelineConfig) -> list[dg.AssetChecksDefinition]:
    """One `validate_<phase>` op per phase, evaluating both blocking checks of `hdf5_<phase>`."""

    def make_checks(phase: str) -> dg.AssetChecksDefinition:
        specs = [
            dg.AssetCheckSpec(
                f"{suite}_suite",
                asset=hdf5_key(phase),
                blocking=True,  # a failure stops the downstream training asset in the same run
                description=f"Great Expectations suite over the {phase} {suite} ({'records' if suite == 'jsonl' else 'examples'}).",
            )
            for suite in SUITES
        ]

        @dg.multi_asset_check(specs=specs, name=f"validate_{phase}")
        def _validate(settings: PipelineSettings):
            from llava_core.validate import describe, validate_phase  # pandas, Great Expectations: this step only

            r = validate_phase(settings.load(), phase)
            # a failed gate is not recorded in dvc.lock: `dvc repro` runs it again (and stops there), as it would
            dvc_lock = commit_gate(settings, f"validate_{phase}") if r.success else "not committed: the gate failed"
            for suite in SUITES:
                s = r.suites[suite]
                failed = [describe(e) for e in s.expectations if not e["success"]]
                yield dg.AssetCheckResult(
                    asset_key=hdf5_key(phase),
                    check_name=f"{suite}_suite",
                    passed=s.success,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        "rows": s.rows,
                        "expectations": s.evaluated,
                        "failed": s.failed,
                        "failures": dg.MetadataValue.md("\n".join(f"- {f}" for f in failed) or "none"),
                        "results": dg.MetadataValue.path(str(r.path)),
                        "dvc_lock": dvc_lock,
                    },
                )

        return _validate

    return [make_checks(p) for p in PHASES]
