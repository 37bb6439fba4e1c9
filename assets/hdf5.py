"""Stage 3 assets: `hdf5_phase1` and `hdf5_phase2`, built from the jsonl datasets of each phase."""

from __future__ import annotations

import dagster as dg

from assets.convert import jsonl_key
from assets.resources import PipelineSettings
from assets.versioning import versioned
from llava_core.config import PHASES, PipelineConfig
from llava_core.hdf5 import build_hdf5


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
                    "discarded_by_reason": dg.MetadataValue.json(r.discarded),
                    "image_start_idx": r.image_start_idx,
                }
            )

        return _hdf5

    return [make(p) for p in PHASES]
