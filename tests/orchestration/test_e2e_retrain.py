"""The weekly retrain on a real instance, after `make demo` (the `demo_run` fixture: its DAGSTER_HOME, its DVC
workspace, phase 2's instructions from the local source `shapes_local`):

- a tick with nothing new starts no run: its skip reason says "up to date";
- a file changed in the local source: the tick's run is that source's chain only (fetched again, phase 2, the
  exports, the evaluation), run here as the daemon would; phase 1 is not retrained; afterwards up to date again
  and `dvc status` clean;
- a changed setting (eval.max_new_tokens) plans the evaluation only; `force` plans everything.
"""

from __future__ import annotations

import datetime as dt
import json

import dagster as dg
import pytest
import yaml

from orchestration.automation import retrain_schedule
from orchestration.definitions import build_definitions
from orchestration.resources import PipelineSettings, S3Resource
from tests.orchestration.test_e2e_dvc import run

pytestmark = pytest.mark.e2e

PHASE2_CHAIN = {
    "raw_shapes_local",
    "jsonl_shapes_instruct",
    "hdf5_phase2",
    "checkpoint_phase2",
    "hf_model",
    "llava_model",
    "eval_report",
}
PHASE1 = {"raw_synthetic_shapes", "jsonl_shapes_pretrain", "hdf5_phase1", "checkpoint_phase1"}
MONDAY = dt.datetime(2026, 12, 7, 3, 0, tzinfo=dt.UTC)


def test_weekly_retrain_runs_only_what_changed(demo_run):
    defs = build_definitions(str(demo_run.params), env="local")
    schedule = defs.resolve_schedule_def("weekly_retrain")
    resources = {"settings": PipelineSettings(params_path=str(demo_run.params)), "s3": S3Resource()}
    with dg.DagsterInstance.from_config(str(demo_run.home)) as instance:

        def tick(week: int, sched=schedule):
            when = MONDAY + dt.timedelta(weeks=week)
            with dg.build_schedule_context(instance=instance, scheduled_execution_time=when, resources=resources) as c:
                return sched(c)

        quiet = tick(0)  # nothing changed since the demo
        assert isinstance(quiet, dg.SkipReason), quiet
        assert quiet.skip_message.startswith("up to date: no source, setting or input of the 11 assets changed")

        # one record fewer in the local source's instructions
        instruct = demo_run.local_source / "instruct.json"
        records = json.loads(instruct.read_text())
        instruct.write_text(json.dumps(records[:-1]))
        request = tick(1)
        assert isinstance(request, dg.RunRequest), request
        assert {k.to_user_string() for k in request.asset_selection} == PHASE2_CHAIN
        assert request.run_config == {"ops": {"raw_shapes_local": {"config": {"refetch": True}}}}
        assert request.tags["llava/retrain"] == "7 of 11 assets" and request.tags["llava/trigger"] == "schedule"
        phase1_runs = {k: instance.get_latest_materialization_event(dg.AssetKey(k)).run_id for k in PHASE1}

        # the run the daemon would launch for this request
        result = defs.resolve_job_def("llava_pipeline").execute_in_process(
            instance=instance,
            asset_selection=request.asset_selection,
            run_config=request.run_config,
            tags=request.tags,
        )
        assert result.success
        made = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert made == PHASE2_CHAIN
        checks = {(c.asset_key.to_user_string(), c.check_name): c.passed for c in result.get_asset_check_evaluations()}
        assert checks == {
            ("hdf5_phase2", "jsonl_suite"): True,
            ("hdf5_phase2", "hdf5_suite"): True,
            ("eval_report", "prompt_suffixes"): True,  # the evaluation suffixes carried by the training data
        }
        assert {k: instance.get_latest_materialization_event(dg.AssetKey(k)).run_id for k in PHASE1} == phase1_runs
        params = json.loads((demo_run.repo / "data/hdf5/phase2/data_params.json").read_text())
        assert params["examples"] == len(records) - 1  # phase 2 retrained on the changed source
        assert "up to date" in run(["dvc", "status"], demo_run.repo, demo_run.env)

        again = tick(2)
        assert isinstance(again, dg.SkipReason) and again.skip_message.startswith("up to date")

        # a setting only the evaluation reads: the evaluation only
        raw = yaml.safe_load(demo_run.params.read_text())
        raw["eval"]["max_new_tokens"] += 1
        demo_run.params.write_text(yaml.safe_dump(raw, sort_keys=False))
        try:
            request = tick(3)
            assert {k.to_user_string() for k in request.asset_selection} == {"eval_report"}
            assert request.run_config == {"ops": {}}
        finally:
            raw["eval"]["max_new_tokens"] -= 1
            demo_run.params.write_text(yaml.safe_dump(raw, sort_keys=False))

        # force: everything, every source fetched again
        forced = tick(4, retrain_schedule(defs.resolve_job_def("llava_pipeline"), force=True))
        assert len(forced.asset_selection) == 11 and forced.tags["llava/retrain"] == "11 of 11 assets (forced)"
        assert set(forced.run_config["ops"]) == {"raw_synthetic_shapes", "raw_shapes_local"}
