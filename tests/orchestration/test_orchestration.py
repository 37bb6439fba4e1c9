"""Orchestration on a real Dagster instance: jobs, resources per environment, the retrain schedule, the S3 source
sensor (moto on loopback), retries of transient failures, the instance's gpu pool, and DVC's hashes."""

from __future__ import annotations

import datetime as dt
import fcntl
import io
import json
import shutil
import subprocess
import uuid

import boto3
import dagster as dg
import pytest
import yaml
from dagster._utils.schedules import schedule_execution_time_iterator  # the daemon's tick times

from assets.download import build_download_assets
from llava_core.params import load_config
from orchestration.automation import DEFAULT_RETRAIN_CRON, retrain_schedule
from orchestration.definitions import build_definitions, build_jobs, build_resources
from orchestration.dvc import DvcError, DvcIgnore, DvcRepo, dvc_hash
from orchestration.resources import PipelineSettings, S3Resource
from tests.conftest import PROJECT
from tests.data.test_download_remote import PAYLOAD, Server, http_source
from tests.helpers_unit import base_params, write_params

DATA = {"raw_synthetic_shapes", "jsonl_shapes_pretrain", "jsonl_shapes_instruct", "hdf5_phase1", "hdf5_phase2"}
TRAIN = {"checkpoint_phase1", "checkpoint_phase2", "hf_model", "llava_model", "eval_report"}


def job_keys(defs: dg.Definitions, name: str) -> set[str]:
    job = defs.resolve_job_def(name)
    return {k.to_user_string() for k in job.asset_layer.selected_asset_keys}


def test_jobs_cover_data_training_and_everything():
    defs = build_definitions()
    assert job_keys(defs, "llava_data") == DATA
    assert job_keys(defs, "llava_train") == TRAIN
    assert job_keys(defs, "llava_pipeline") == DATA | TRAIN
    graph = defs.resolve_asset_graph()
    # lineage from the raw source to the report, every asset reachable from it
    assert dg.AssetSelection.assets("raw_synthetic_shapes").downstream().resolve(graph) == {
        dg.AssetKey(k) for k in DATA | TRAIN
    }
    # transient failures are retried: transfers in, uploads out
    assert graph.get(dg.AssetKey("raw_synthetic_shapes")).assets_def.op.retry_policy.max_retries == 3
    assert graph.get(dg.AssetKey("hdf5_phase1")).assets_def.op.retry_policy is None


def test_resources_follow_the_environment(monkeypatch):
    monkeypatch.setenv("LLAVA_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    local = build_resources("p.yaml", "local")
    assert local["settings"].dvc_remote is None and local["s3"].endpoint_url == "http://127.0.0.1:9000"
    assert local["s3"].aws_secret_access_key is None  # boto3's own chain
    monkeypatch.setenv("LLAVA_DVC_REMOTE", "shared")
    s3 = build_resources("p.yaml", "s3")
    assert s3["settings"].dvc_remote == "shared"
    # secrets are references to the environment, read at run time, never values in the definitions
    assert isinstance(s3["s3"].aws_secret_access_key, dg.EnvVar)
    assert s3["s3"].aws_secret_access_key.env_var_name == "AWS_SECRET_ACCESS_KEY"
    monkeypatch.setenv("LLAVA_EXECUTOR", "in_process")
    assert build_definitions().executor == dg.in_process_executor
    monkeypatch.setenv("LLAVA_EXECUTOR", "threads")
    with pytest.raises(
        ValueError,
        match=r"LLAVA_EXECUTOR='threads': unknown executor; valid: \['in_process', 'multiprocess', 'multiprocess_spawn'\]",
    ):
        build_definitions()
    monkeypatch.delenv("LLAVA_EXECUTOR")
    # the default: a process per step, forked from a server that imported the stages' libraries once per run
    executor = build_definitions().executor
    assert executor.name == "multiprocess_forkserver"
    from dagster._core.definitions.executor_definition import ExecutorDefinition

    assert isinstance(executor, ExecutorDefinition)
    monkeypatch.setenv("LLAVA_ENV", "cloud")
    with pytest.raises(ValueError, match=r"LLAVA_ENV='cloud': unknown environment; valid: \['local', 's3'\]"):
        build_definitions()


def test_weekly_retrain_schedule_requests_what_was_never_made(monkeypatch, tmp_path):
    defs = build_definitions()
    schedule = defs.resolve_schedule_def("weekly_retrain")
    assert schedule.cron_schedule == DEFAULT_RETRAIN_CRON and schedule.job_name == "llava_pipeline"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    when = dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.UTC)
    resources = {"settings": PipelineSettings(params_path=str(PROJECT / "params.yaml")), "s3": S3Resource()}
    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(
            instance=instance, scheduled_execution_time=when, resources=resources
        ) as context:
            request = schedule(context)
    assert request.run_key == "retrain-2026-11-23T03:00:00+00:00"
    assert request.tags["llava/trigger"] == "schedule"
    # nothing materialised yet: every asset, for that reason (tests/orchestration/test_e2e_retrain.py: the rest)
    assert {k.to_user_string() for k in request.asset_selection} == DATA | TRAIN
    assert request.tags["llava/retrain"] == "10 of 10 assets" and request.run_config == {"ops": {}}
    # what derives from the planned assets outside the stage table comes along: the upload of the models
    params = base_params(tmp_path / "ws")
    params["publish"] = {"bucket": "models", "models": ["hf"]}
    published = build_definitions(str(write_params(tmp_path, params))).resolve_schedule_def("weekly_retrain")
    resources["settings"] = PipelineSettings(params_path=str(tmp_path / "params.yaml"))
    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(
            instance=instance, scheduled_execution_time=when, resources=resources
        ) as context:
            assert dg.AssetKey("published_model") in published(context).asset_selection
    # the ticks fall on Mondays at 03:00
    start = dt.datetime(2026, 11, 24, tzinfo=dt.UTC).timestamp()
    ticks = schedule_execution_time_iterator(start, schedule.cron_schedule, schedule.execution_timezone)
    first, second = next(ticks), next(ticks)
    assert (first.weekday(), first.hour, (second - first).days) == (0, 3, 7)

    monkeypatch.setenv("LLAVA_RETRAIN_CRON", "30 1 * * *")
    assert build_definitions().resolve_schedule_def("weekly_retrain").cron_schedule == "30 1 * * *"
    job = build_jobs()["llava_pipeline"]
    with pytest.raises(
        ValueError, match=r"LLAVA_RETRAIN_CRON='every monday': not a valid schedule \(e\.g\. '0 3 \* \* 1'\)"
    ):
        retrain_schedule(job, cron="every monday")


def s3_workspace(tmp_path, endpoint: str, bucket: str):
    params = base_params(tmp_path / "ws")
    params["sources"]["charts"] = {
        "kind": "s3",
        "location": f"s3://{bucket}/charts",
        "patterns": ["*.json"],
        "options": {"endpoint_url": endpoint, "region": "us-east-1"},
    }
    params["sources"]["gone"] = {
        "kind": "s3",
        "location": "s3://no-such-bucket-here/x",
        "options": {"endpoint_url": endpoint, "region": "us-east-1"},
    }
    params["datasets"]["charts_qa"] = {
        "source": "charts",
        "file": "qa.json",
        "converter": "llava_json",
        "phase": "phase2",
    }
    return write_params(tmp_path, params)


def test_s3_sensor_fires_once_per_change(tmp_path, s3_endpoint, aws_env):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"src-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    client.upload_fileobj(io.BytesIO(b"[]"), bucket, "charts/qa.json")
    defs = build_definitions(str(s3_workspace(tmp_path, s3_endpoint, bucket)))
    sensor = defs.resolve_sensor_def("s3_source_changed")
    assert sensor.job_name == "llava_pipeline"
    resources = {"s3": S3Resource()}

    with dg.instance_for_test() as instance:
        cursor = None

        def tick():
            nonlocal cursor
            # closed at once: an open context keeps the instance's state storage as Dagster's current one
            with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
                result = sensor(context)
            cursor = result.cursor
            return result

        first = tick()
        assert not first.run_requests
        assert "charts: baseline recorded" in first.skip_reason.skip_message
        assert "gone: listing failed" in first.skip_reason.skip_message  # one bad prefix hides no other
        assert set(json.loads(cursor)) == {"charts"}
        assert "charts: unchanged" in tick().skip_reason.skip_message

        client.upload_fileobj(io.BytesIO(b"[1]"), bucket, "charts/more.json")  # a new object
        fired = tick()
        assert len(fired.run_requests) == 1
        request = fired.run_requests[0]
        assert request.tags["llava/source"] == "charts"
        assert {k.to_user_string() for k in request.asset_selection} == {
            "raw_charts",
            "jsonl_charts_qa",
            "hdf5_phase2",
            "checkpoint_phase2",
            "hf_model",
            "llava_model",
            "eval_report",
        }  # fmt: skip  (phase 1 and the other source are not downstream of charts)
        assert request.run_config == {"ops": {"raw_charts": {"config": {"refetch": True}}}}
        job = defs.resolve_job_def("llava_pipeline")
        assert dg.validate_run_config(job, request.run_config)  # the job accepts the refetch config
        assert not tick().run_requests  # once per change

        client.upload_fileobj(io.BytesIO(b"[22]"), bucket, "charts/qa.json")  # same key, new content
        changed = tick()
        assert len(changed.run_requests) == 1 and changed.run_requests[0].run_key != request.run_key
        client.upload_fileobj(io.BytesIO(b"ignored"), bucket, "charts/notes.txt")  # outside the patterns
        assert not tick().run_requests
        client.delete_object(Bucket=bucket, Key="charts/more.json")  # a removed object
        assert len(tick().run_requests) == 1
        assert not tick().run_requests


def test_transient_download_failure_is_retried(tmp_path):
    """A 503 that outlasts the transfer's own retries fails the step; Dagster's retry policy runs it again."""
    with Server({"/d/data.bin": PAYLOAD}, fail_first=1) as srv:
        params = base_params(tmp_path / "ws")
        params["sources"] = {"web": http_source(srv.url("/d/data.bin"), PAYLOAD)}
        params["sources"]["web"]["options"]["retries"] = 0
        params["datasets"] = {}
        path = write_params(tmp_path, params)
        cfg = load_config(path)
        assets = build_download_assets(cfg, retry_policy=dg.RetryPolicy(max_retries=2, delay=0))
        with dg.instance_for_test() as instance:
            result = dg.materialize(
                assets, instance=instance, resources={"settings": PipelineSettings(params_path=str(path))}
            )
            assert result.success
            retries = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
            assert len(retries) == 1 and len(srv.requests) == 2
            mat = instance.get_latest_materialization_event(dg.AssetKey("raw_web")).asset_materialization
    raw = cfg.raw_dir("web")
    assert (raw / "data.bin").read_bytes() == PAYLOAD
    # outside a DVC repository the data version is still the hash dvc.lock would record
    assert mat.tags["dagster/data_version"] == dvc_hash(raw).md5 == mat.metadata["dvc_md5"].value
    assert mat.metadata["output_files"].value == 2  # data.bin + manifest.json
    assert "is not a DVC repository" in mat.metadata["dvc_lock"].value


def test_dagster_yaml_limits_the_gpu_pool_to_one(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(PROJECT / "configs/dagster/dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.global_op_concurrency_default_limit == 1
        storage = instance.event_log_storage
        storage.initialize_concurrency_limit_to_default("gpu")  # what a run does when a gpu step starts
        assert instance.get_concurrency_config().pool_config.pool_granularity.value == "op"
        assert storage.get_concurrency_info("gpu").slot_count == 1
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 4


def dvc(cmd: list[str], cwd, venv_env) -> str:
    proc = subprocess.run(["dvc", *cmd], cwd=cwd, env=venv_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dvc_hash_equals_what_dvc_records(tmp_path, venv_env):
    """Folders (nested, with .dvcignore'd extracted images) and files hash as `dvc add` records them."""
    repo = tmp_path / "repo"
    src = repo / "data/raw/src"
    for rel, data in {"a.json": b"{}", "img/b c.png": b"\x89PNG" * 100, "img/z/ü.txt": "ü".encode(), "0": b""}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "extracted/ds").mkdir(parents=True)
    (src / "extracted/ds/1.png").write_bytes(b"converter output")
    (repo / "single.jsonl").write_text('{"id": 1}\n')
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(["init", "-q"], repo, venv_env)
    shutil.copy(PROJECT / ".dvcignore", repo / ".dvcignore")
    dvc(["add", "-q", "data/raw/src", "single.jsonl"], repo, venv_env)
    recorded = {p: yaml.safe_load((repo / f"{p}.dvc").read_text())["outs"][0] for p in ("data/raw/src", "single.jsonl")}
    ignore = DvcIgnore(repo)
    folder, single = dvc_hash(src, ignore), dvc_hash(repo / "single.jsonl", ignore)
    assert folder.md5 == recorded["data/raw/src"]["md5"] and folder.md5.endswith(".dir")
    assert (folder.files, folder.bytes) == (recorded["data/raw/src"]["nfiles"], recorded["data/raw/src"]["size"])
    assert folder.files == 4  # extracted/ left out, as .dvcignore says
    assert single.md5 == recorded["single.jsonl"]["md5"]
    assert dvc_hash(src).md5 != folder.md5  # without the ignore file the extracted image counts
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dvc_hash(repo / "nothing")


def test_busy_dvc_repository_is_waited_for_then_times_out(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc/config").write_text("[core]\n    no_scm = True\n")  # a DVC repository outside git
    repo = DvcRepo(tmp_path, lock_timeout_s=0.5)
    with open(repo._lock_path, "a+") as held:  # another step of this project is running a DVC command
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DvcError, match=r"dvc version: .*llava-dvc.lock still held after 0.5 s"):
            repo.run("version")
    assert "DVC version" in repo.run("version")  # released: the command runs
    with pytest.raises(DvcError, match=r"dvc version: no answer within 0.01 s"):
        repo.run("version", timeout_s=0.01)
