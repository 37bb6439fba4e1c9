"""The whole chain through Dagster on a real (temporary) instance: the default data set, the tiny model.

This is also the learning test: on the fixed seed of the embedded default the tiny model must answer the
held-out colour, count and colour yes/no questions far above chance (1/5, 1/3, 1/2). The floors are
conservative (see README for the measured figures); a broken image path, mask or converter drops accuracy to
chance.
"""

from __future__ import annotations

import json

import dagster as dg
import h5py
import pytest

from orchestration.definitions import build_assets, build_checks, build_definitions
from orchestration.resources import PipelineSettings
from tests.conftest import e2e_params

pytestmark = pytest.mark.e2e

EXPECTED_ASSETS = {
    "raw_synthetic_shapes",
    "jsonl_shapes_pretrain",
    "jsonl_shapes_instruct",
    "hdf5_phase1",
    "hdf5_phase2",
    "checkpoint_phase1",
    "checkpoint_phase2",
    "hf_model",
    "llava_model",
    "eval_report",
}


def test_definitions_load_with_lineage_and_job():
    defs = build_definitions()
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == EXPECTED_ASSETS
    # lineage from the raw source to the report
    assert graph.get(dg.AssetKey("eval_report")).parent_keys == {
        dg.AssetKey("hf_model"),
        dg.AssetKey("raw_synthetic_shapes"),
        dg.AssetKey("hdf5_phase2"),  # the training questions' suffix statistics
    }
    # the data and training stages also read the images: the source folder of their datasets
    assert graph.get(dg.AssetKey("checkpoint_phase2")).parent_keys == {
        dg.AssetKey("hdf5_phase2"),
        dg.AssetKey("checkpoint_phase1"),
        dg.AssetKey("raw_synthetic_shapes"),
    }
    assert graph.get(dg.AssetKey("hdf5_phase1")).parent_keys == {
        dg.AssetKey("jsonl_shapes_pretrain"),
        dg.AssetKey("raw_synthetic_shapes"),
    }
    job = defs.resolve_job_def("llava_pipeline")
    assert {n.name for n in job.nodes} == EXPECTED_ASSETS | {"validate_phase1", "validate_phase2"}
    # each hdf5 asset carries its two blocking Great Expectations checks
    for phase in ("phase1", "phase2"):
        checks = graph.get(dg.AssetKey(f"hdf5_{phase}")).check_keys
        assert {c.name for c in checks} == {"jsonl_suite", "hdf5_suite"}
        assert all(graph.get_check_spec(c).blocking for c in checks)


@pytest.mark.slow  # about 7 min on 2 cores: `make demo` runs the same job; `make test-all` asserts its floors
def test_materialize_default_pipeline_learns(tmp_path):
    params = e2e_params(tmp_path / "ws", small=False)
    from llava_core.params import load_config

    cfg = load_config(params)
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        result = dg.materialize(
            [*build_assets(cfg), *build_checks(cfg)],
            instance=instance,
            resources={"settings": PipelineSettings(params_path=str(params))},
        )
        assert result.success
        checks = result.get_asset_check_evaluations()
        # the data gates let training run; the report asks every category as the training data did
        assert len(checks) == 5 and all(c.passed for c in checks)
        assert {c.check_name for c in checks} == {"jsonl_suite", "hdf5_suite", "prompt_suffixes"}
        mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
        assert set(mats) == EXPECTED_ASSETS
        # the instance recorded every materialisation
        for key in EXPECTED_ASSETS:
            assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None

    meta = {k: m.event_specific_data.materialization.metadata for k, m in mats.items()}
    options = cfg.sources["synthetic_shapes"].options
    assert meta["jsonl_shapes_instruct"]["written"].value == options["num_instruct"]
    assert meta["hdf5_phase2"]["examples"].value == options["num_instruct"]  # nothing dropped
    assert meta["checkpoint_phase2"]["final_loss"].value < meta["checkpoint_phase2"]["first_loss"].value

    report = json.loads((tmp_path / "ws/reports/eval.json").read_text())
    by = report["by_category"]
    questions = (tmp_path / "ws/data/raw/synthetic_shapes/eval_questions.jsonl").read_text().splitlines()
    assert report["num_questions"] == len(questions) == 7 * options["num_eval_images"]
    # Floors on what the tiny model learns in this budget, well below what it reaches (README: the measured
    # figures, and the study over seeds behind them: colour yes/no 1.0 in 7 of 7 runs). Shape yes/no questions
    # ("is there a circle?") are not asserted: 1.0 here, but in 4 of those 7 runs only ("Known limits").
    assert by["color"]["accuracy"] >= 0.4, by  # chance 0.2
    assert by["count"]["accuracy"] >= 0.8, by  # chance 0.33
    assert by["color_exists"]["accuracy"] >= 0.8, by  # balanced yes/no: chance 0.5
    assert 0.3 <= by["color_exists"]["yes_ratio"] <= 0.7, by  # not one answer for everything
    for kind in ("exists", "color_exists"):  # POPE metrics are computed over balanced yes/no questions
        assert by[kind]["n"] == 2 * options["num_eval_images"] and 0.0 <= by[kind]["yes_ratio"] <= 1.0
    answers = [json.loads(line) for line in (tmp_path / "ws/reports/answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [json.loads(q)["question_id"] for q in questions]
    with h5py.File(tmp_path / "ws/data/hdf5/phase2/data-00000.h5") as h5:
        assert h5["data"].shape[1:] == (4, cfg.hdf5["phase2"].max_sequence_length)
