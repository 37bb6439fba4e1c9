"""Stage 4 assets: `checkpoint_phase1` (projector) then `checkpoint_phase2` (projector + LLM).

Each asset starts the training process (`accelerate launch`, the same command as the CLI and DVC) through
Dagster Pipes: the launched main process streams its log lines and metrics records to the run and reports
the materialisation metadata (summary numbers, the loss curve). The model and the loop live in that
process, never in the asset. The assets run in the concurrency pool `gpu` (set its limit to the number of
training jobs the machine can hold, e.g. `dagster instance concurrency set gpu 1`).
"""

from __future__ import annotations

import dagster as dg

from assets.hdf5 import hdf5_key
from assets.resources import PipelineSettings
from assets.versioning import versioned
from llava_core.config import PHASES
from llava_core.launch import finished, launch_command, launch_env, previous_phase

TRAIN_POOL = "gpu"


def checkpoint_key(phase: str) -> dg.AssetKey:
    return dg.AssetKey(f"checkpoint_{phase}")


def build_train_assets() -> list[dg.AssetsDefinition]:
    def make(phase: str) -> dg.AssetsDefinition:
        prev = previous_phase(phase)
        deps = [hdf5_key(phase)] + ([checkpoint_key(prev)] if prev else [])

        @dg.asset(
            key=checkpoint_key(phase),
            deps=deps,
            group_name="train",
            kinds={"pytorch"},
            pool=TRAIN_POOL,
            description=f"Trained {phase} checkpoint in checkpoints/{phase}/ (resumes a killed run of the same config).",
        )
        @versioned(checkpoint_key(phase))
        def _ckpt(context, settings: PipelineSettings) -> dg.MaterializeResult:  # context: AssetExecutionContext
            cfg = settings.load()
            invocation = dg.PipesSubprocessClient().run(
                context=context, command=launch_command(cfg, phase), env=launch_env()
            )
            custom = invocation.get_custom_messages()
            finished(cfg, phase)  # the summary must be there (a complete checkpoint); removes the launch spec
            reported = invocation.get_materialize_result()  # what the training process reported through Pipes
            return dg.MaterializeResult(metadata={**reported.metadata, "pipes_metrics_records": len(custom)})

        return _ckpt

    return [make(p) for p in PHASES]
