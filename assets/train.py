"""Stage 4 assets: `checkpoint_phase1` (projector) then `checkpoint_phase2` (projector + LLM).

Each asset starts the training process (`accelerate launch`) through the stage function; the model and
the loop live in that process, never in the asset.
"""

from __future__ import annotations

import dagster as dg

from assets.hdf5 import hdf5_key
from assets.resources import PipelineSettings
from assets.versioning import versioned
from llava_core.config import PHASES
from llava_core.train import previous_phase, train


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
            description=f"Trained {phase} checkpoint in checkpoints/{phase}/.",
        )
        @versioned(checkpoint_key(phase))
        def _ckpt(settings: PipelineSettings) -> dg.MaterializeResult:
            r = train(settings.load(), phase)
            s = r.summary
            return dg.MaterializeResult(
                metadata={
                    "path": dg.MetadataValue.path(str(r.path)),
                    "steps": r.steps,
                    "final_loss": r.final_loss,
                    "first_loss": s["first_loss"],
                    "seconds": s["seconds"],
                    "trainable_parameters": s["trainable_parameters"],
                    "total_parameters": s["total_parameters"],
                }
            )

        return _ckpt

    return [make(p) for p in PHASES]
