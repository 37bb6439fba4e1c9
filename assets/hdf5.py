"""Stage 3 assets: `hdf5_phase1` and `hdf5_phase2`, built from the jsonl datasets of each phase, and their
blocking Great Expectations checks (`jsonl_suite`, `hdf5_suite`): training does not start after a failure."""

import dagster as dg

from llava_core.config import PipelineConfig
from llava_core.data.hdf5_writer import build_hdf5
from llava_core.pipeline import asset_inputs, stage
from llava_core.stage_guard import run_guarded

STAGE, GATE = stage("hdf5"), stage("validate")
SUITES = ("jsonl", "hdf5")


def hdf5_key(phase: str) -> dg.AssetKey:
    return dg.AssetKey(STAGE.asset_name(phase))


def build_hdf5_assets(cfg: PipelineConfig) -> list[dg.AssetsDefinition]:
    def make(phase: str) -> dg.AssetsDefinition:
        name = STAGE.asset_name(phase)

        @dg.asset(
            key=name,
            deps=asset_inputs(cfg, STAGE, phase),
            group_name="hdf5",
            kinds={"hdf5"},
            required_resource_keys={"settings"},
            description=f"Tokenised {phase} examples with image slots and loss masks.",
        )
        def _hdf5(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            settings = context.resources.settings
            r = run_guarded(STAGE, settings.load(), phase, build_hdf5)
            metadata = {
                "path": dg.MetadataValue.path(str(r.path)),
                "examples": r.examples,
                "processed": r.processed,
                "files": r.files,
                "discarded_by_reason": dg.MetadataValue.json(r.discarded),
                "image_notes": dg.MetadataValue.json(r.image_notes),
                "image_start_idx": r.image_start_idx,
                "images_decoded": r.images_decoded,  # the others' verdicts came from the image checks' cache
                "images_cached": r.images_cached,
            }
            return settings.record_version(name, dg.MaterializeResult(metadata=metadata))

        return _hdf5

    return [make(p) for p in STAGE.keys(cfg)]


def build_hdf5_checks(cfg: PipelineConfig) -> list[dg.AssetChecksDefinition]:
    """One `validate_<phase>` op per phase, evaluating both blocking checks of `hdf5_<phase>`."""

    def make_checks(phase: str) -> dg.AssetChecksDefinition:
        specs = [
            dg.AssetCheckSpec(
                f"{suite}_suite",
                asset=hdf5_key(phase),
                blocking=True,  # a failure stops the downstream training asset in the same run
                description=f"Great Expectations suite over the {phase} {suite} "
                f"({'records' if suite == 'jsonl' else 'examples'}).",
            )
            for suite in SUITES
        ]

        @dg.multi_asset_check(specs=specs, name=GATE.dvc_name(phase), required_resource_keys={"settings"})
        def _validate(context: dg.AssetCheckExecutionContext):
            from llava_core.data.validate import describe, validate_phase  # pandas, Great Expectations: this step only

            settings = context.resources.settings
            r = run_guarded(GATE, settings.load(), phase, validate_phase)
            # a failed gate is not recorded in dvc.lock: `dvc repro` runs it again (and stops there), as it would
            dvc_lock = settings.commit_gate(GATE.dvc_name(phase)) if r.success else "not committed: the gate failed"
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

    return [make_checks(p) for p in GATE.keys(cfg)]
