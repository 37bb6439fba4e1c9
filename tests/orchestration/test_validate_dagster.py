"""The Great Expectations suites as blocking Dagster asset checks, on a real (temporary) Dagster instance:
a failing suite stops the training asset downstream in the same run; passing suites let it run."""

from __future__ import annotations

import dagster as dg

from assets.hdf5 import hdf5_key
from assets.train import checkpoint_key
from orchestration.definitions import build_assets, build_checks
from orchestration.resources import PipelineSettings
from tests.helpers_hdf5 import small_workspace

RAN = []


@dg.asset(deps=[hdf5_key("phase1")])
def after_gate() -> None:
    """A probe downstream of the checked asset: records that it was allowed to run."""
    RAN.append(True)


def _run(cfg, tmp_path, *downstream: dg.AssetKey):
    selection = [hdf5_key("phase1"), dg.AssetKey("after_gate"), *downstream]
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        result = dg.materialize(
            [*build_assets(cfg), *build_checks(cfg), after_gate],
            instance=instance,
            selection=dg.AssetSelection.assets(*selection) | dg.AssetSelection.checks_for_assets(hdf5_key("phase1")),
            resources={"settings": PipelineSettings(params_path=str(cfg.base_dir / "params.yaml"))},
            raise_on_error=False,
        )
        materialized = {e.asset_key for e in result.get_asset_materialization_events()}
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        stored = instance.get_latest_materialization_event(checkpoint_key("phase1"))
    return result, materialized, checks, stored


def test_failing_suite_blocks_training(tmp_path):
    RAN.clear()
    cfg = small_workspace(tmp_path / "ws", extra={"shapes_pretrain": ["{not json"]})
    _, materialized, checks, stored = _run(cfg, tmp_path, checkpoint_key("phase1"))  # the real training asset
    assert hdf5_key("phase1") in materialized  # the data was written (the writer counts the bad record) ...
    assert not checks["jsonl_suite"].passed  # ... but it fails its suite
    assert checks["jsonl_suite"].severity == dg.AssetCheckSeverity.ERROR
    assert "parsed" in checks["jsonl_suite"].metadata["failures"].value
    assert checks["hdf5_suite"].passed
    assert checkpoint_key("phase1") not in materialized and stored is None  # training never started
    assert dg.AssetKey("after_gate") not in materialized and not RAN


def test_passing_suites_let_downstream_run(tmp_path):
    RAN.clear()
    cfg = small_workspace(tmp_path / "ws")
    _, materialized, checks, _ = _run(cfg, tmp_path)  # (training itself is run by the end-to-end tests)
    assert checks["jsonl_suite"].passed and checks["hdf5_suite"].passed
    assert checks["hdf5_suite"].metadata["rows"].value == 20
    assert dg.AssetKey("after_gate") in materialized and RAN
