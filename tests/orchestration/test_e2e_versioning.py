"""Dagster and DVC agree, on a temporary DVC repository holding the project (data stages of the small preset):

- a Dagster materialisation records data versions equal to dvc.lock, and leaves `dvc status` clean;
- in the `s3` environment each stage is pushed to an S3 remote (moto on loopback): wipe the cache and the
  outputs, `dvc pull` restores byte-identical files;
- after `dvc repro`, the dvc.lock sensor brings Dagster's data versions to dvc.lock and every asset is fresh;
- DVC commands started at the same time are serialised, not failed.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import uuid

import boto3
import dagster as dg
import pytest
import yaml
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver  # the resolver the UI's status uses

from llava_core.params import load_config
from orchestration.automation import latest_data_version
from orchestration.definitions import build_assets, build_definitions
from orchestration.dvc import DvcRepo
from orchestration.resources import PipelineSettings
from tests.conftest import PROJECT, dvc_project
from tests.orchestration.conftest import run

pytestmark = pytest.mark.e2e

DATA_ASSETS = {
    "raw_synthetic_shapes": ("download_synthetic_shapes", "data/raw/synthetic_shapes"),
    "jsonl_shapes_pretrain": ("convert_shapes_pretrain", "data/jsonl/shapes_pretrain.jsonl"),
    "jsonl_shapes_instruct": ("convert_shapes_instruct", "data/jsonl/shapes_instruct.jsonl"),
    "hdf5_phase1": ("hdf5_phase1", "data/hdf5/phase1"),
    "hdf5_phase2": ("hdf5_phase2", "data/hdf5/phase2"),
}
DATA_STAGES = [stage for stage, _ in DATA_ASSETS.values()]


def lock_md5(repo, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for o in lock[stage]["outs"]}[path]


def cached_outputs(repo) -> dict[str, str]:
    """sha256 of every file of the data stages' cached outputs (the metrics files are `cache: false`)."""
    files = []
    for _, path in DATA_ASSETS.values():
        out = repo / path
        files += sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else [out]
    return {p.relative_to(repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_dagster_and_dvc_agree_push_pull_and_sync(tmp_path, venv_env, s3_endpoint, aws_env, monkeypatch):
    repo = tmp_path / "repo"
    env = {**venv_env, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    params = dvc_project(repo, env)
    bucket = f"dvc-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    run(["python", str(PROJECT / "scripts/dvc_remote.py"), f"s3://{bucket}/cache", "--endpoint", s3_endpoint,
         "--region", "us-east-1", "--root", str(repo)], repo, env)  # fmt: skip
    local_config = (repo / ".dvc/config.local").read_text()
    assert s3_endpoint in local_config and "secret_access_key = testing" in local_config
    assert "testing" not in (repo / ".dvc/config").read_text()  # credentials stay in the local config

    # 1. Dagster (S3-backed environment): data versions equal dvc.lock, each stage pushed, dvc status clean
    monkeypatch.setenv("LLAVA_S3_ENDPOINT_URL", s3_endpoint)
    defs = build_definitions(str(params), env="s3")
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        result = defs.resolve_job_def("llava_data").execute_in_process(instance=instance)
        assert result.success
        mats = {e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()}
        assert set(mats) == set(DATA_ASSETS)
        for key, (stage, path) in DATA_ASSETS.items():
            m = mats[key]
            assert m.tags["dagster/data_version"] == lock_md5(repo, stage, path) == m.metadata["dvc_md5"].value
            assert m.metadata["dvc_stage"].value == stage and m.metadata["dvc_remote"].value == "storage"
            assert m.metadata["output_bytes"].value > 0 and m.metadata["output_files"].value >= 1
        assert mats["raw_synthetic_shapes"].tags["dagster/data_version"].endswith(".dir")
        assert "up to date" in run(["dvc", "status", *DATA_STAGES], repo, env)
        assert "are in sync" in run(["dvc", "status", "--cloud", *DATA_STAGES], repo, env)  # all pushed

        # 2. wipe the cache and the cached outputs: dvc pull restores every file, byte for byte
        before = cached_outputs(repo)
        assert len(before) > 40  # images, json files, jsonl, shards
        shutil.rmtree(repo / ".dvc/cache")
        for _, path in DATA_ASSETS.values():  # the reports (`cache: false`) belong in git, not the remote
            shutil.rmtree(repo / path) if (repo / path).is_dir() else (repo / path).unlink()
        run(["dvc", "pull", *DATA_STAGES], repo, env)
        assert cached_outputs(repo) == before

        # 3. dvc repro of a changed stage; the dvc.lock sensor brings Dagster to dvc.lock, everything fresh
        p = yaml.safe_load(params.read_text())
        p["hdf5"]["phase1"]["shard_size"] = 8  # 20 records -> 3 shards instead of 1
        params.write_text(yaml.safe_dump(p, sort_keys=False))
        out = run(["dvc", "repro", "hdf5_phase1"], repo, env)
        assert "Running stage 'hdf5_phase1'" in out and "convert_" not in out.split("Running stage")[-1]
        new_md5 = lock_md5(repo, "hdf5_phase1", "data/hdf5/phase1")
        assert new_md5 != mats["hdf5_phase1"].tags["dagster/data_version"]
        sensor = defs.resolve_sensor_def("dvc_lock_sync")
        resources = {"settings": PipelineSettings(params_path=str(params))}

        def tick(cursor=None):
            # closed at once: an open context keeps the instance's state storage as Dagster's current one
            with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
                return sensor(context)

        sync = tick()
        assert [e.asset_key.to_user_string() for e in sync.asset_events] == ["hdf5_phase1"]
        event = sync.asset_events[0]
        assert event.tags["dagster/data_version"] == new_md5
        assert event.tags["dagster/input_data_version/jsonl_shapes_pretrain"] == lock_md5(
            repo, "convert_shapes_pretrain", "data/jsonl/shapes_pretrain.jsonl"
        )
        for e in sync.asset_events:  # what the sensor daemon does with them
            instance.report_runless_asset_event(e)
        resolver = get_stale_status_resolver(instance, build_assets(load_config(params)))
        for key, (stage, path) in DATA_ASSETS.items():
            assert latest_data_version(instance, dg.AssetKey(key)) == lock_md5(repo, stage, path)
            assert resolver.get_status(dg.AssetKey(key)) == StaleStatus.FRESH, key
        # once per change: the same dvc.lock gives nothing more, with or without the cursor
        assert "dvc.lock unchanged" in tick(sync.cursor).skip_reason.skip_message
        again = tick()
        assert not again.asset_events and "already at dvc.lock" in again.skip_reason.skip_message

    # 4. concurrent DVC commands (as from parallel Dagster steps) are serialised, not failed
    (repo / "dvc.lock").unlink()
    dvc = DvcRepo(repo, lock_timeout_s=300)
    errors: list[BaseException] = []

    def commit(stage: str) -> None:
        try:
            dvc.run("commit", "--force", "--quiet", stage)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(s,)) for s in DATA_STAGES[:3]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == set(DATA_STAGES[:3])
    assert "up to date" in run(["dvc", "status", *DATA_STAGES[:3]], repo, env)
