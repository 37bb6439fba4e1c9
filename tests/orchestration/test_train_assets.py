"""The training assets through Dagster Pipes on a real instance: the launched process reports its log lines,
one message per metrics record and the materialisation metadata (loss curve included); the assets run in
the `gpu` concurrency pool."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from assets.train import TRAIN_POOL, checkpoint_key
from llava_core.params import load_config
from llava_core.plots import png_markdown
from llava_core.training.observe import read_metrics
from orchestration.definitions import build_assets, build_definitions
from orchestration.resources import PipelineSettings
from tests.conftest import e2e_params


def test_training_assets_run_in_the_gpu_pool():
    defs = build_definitions()
    for phase in ("phase1", "phase2"):
        assert defs.resolve_assets_def(checkpoint_key(phase)).op.pool == TRAIN_POOL == "gpu"


@pytest.mark.e2e
def test_checkpoint_asset_reports_through_pipes(tmp_path):
    params = e2e_params(tmp_path / "ws")
    raw = yaml.safe_load(params.read_text())
    raw["train"]["phase1"]["log_every"] = 1
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(params)
    selection = ["raw_synthetic_shapes", "jsonl_shapes_pretrain", "hdf5_phase1", "checkpoint_phase1"]
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        result = dg.materialize(
            build_assets(cfg),
            selection=[dg.AssetKey(k) for k in selection],
            instance=instance,
            resources={"settings": PipelineSettings(params_path=str(params))},
        )
        assert result.success
        mat = next(m for m in result.get_asset_materialization_events() if m.asset_key == checkpoint_key("phase1"))
        meta = mat.event_specific_data.materialization.metadata
        records = read_metrics(cfg.checkpoint_dir("phase1") / "metrics.jsonl")
        steps = len(records)
        assert steps == 4  # 64 records, batch 16, one epoch
        # reported by the training process (the asset itself computes none of these)
        assert meta["steps"].value == steps
        assert meta["final_loss"].value == pytest.approx(records[-1]["loss"])
        assert meta["pipes_metrics_records"].value == steps
        assert meta["loss_curve"].value.endswith(f"-> {records[-1]['loss']:.4f} over {steps} steps)")
        # the picture drawn by the training process beside the checkpoint, shown inline by the UI
        png = (cfg.checkpoint_dir("phase1") / "loss_curve.png").read_bytes()
        assert meta["loss_plot"].value == png_markdown(png, "loss and learning rate against step")
        assert meta["path"].value == str(cfg.checkpoint_dir("phase1"))
        # checked and planned before the launch (tests/training/test_launch_unit.py), recorded with the run
        assert "memory plan, phase1: single over 1 process(es)" in meta["memory_plan"].value
        assert (meta["device_kind"].value, meta["world_size"].value) == ("cpu", 1)
        # the process's log lines reach the run's event log through Pipes
        logs = [e.user_message for e in instance.all_logs(result.run_id)]
        assert any("[phase1] step 4 loss" in m for m in logs)
        assert any("[phase1] freeze" in m and "trainable 24,832" in m for m in logs)
