"""The model registry asset: `registered_model`, when params.yaml has a `registry` section (off by default).

After the evaluation, the exported model becomes the next GTO version of its dvc.yaml artifact (and gets the
configured stage): `settings.register_model()`, which commits dvc.lock and the results kept in git and tags that
commit (orchestration/registry.py). Below `registry.min_accuracy` nothing is registered; the materialisation says
why.
"""

import dagster as dg

from llava_core.config import PipelineConfig
from llava_core.pipeline import stage

EVALUATE = stage("evaluate")


def build_registry_assets(cfg: PipelineConfig) -> list[dg.AssetsDefinition]:
    if cfg.registry is None:
        return []
    rc = cfg.registry

    @dg.asset(
        key="registered_model",
        deps=[dg.AssetKey(EVALUATE.asset_name(None))],
        group_name="export",
        kinds={"dvc"},
        required_resource_keys={"settings"},
        description=f"The evaluated model registered as the next {rc.bump} version of `{rc.artifact}`"
        + (f", stage `{rc.stage}`" if rc.stage else "")
        + " (GTO tags over dvc.yaml's artifacts).",
    )
    def registered_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        r = context.resources.settings.register_model()
        metadata = {"artifact": r.artifact, "registered": r.registered, "outcome": r.reason}
        if r.accuracy is not None:
            metadata["overall_accuracy"] = r.accuracy
        if r.registered:
            metadata.update({"version": r.version, "commit": r.commit, "tags": ", ".join(r.tags)})
            if r.stage:
                metadata["stage"] = r.stage
        return dg.MaterializeResult(metadata=metadata)

    return [registered_model]
