"""Faults: SIGKILL during each stage, then a re-run; transient S3 errors; a full disk.

- SIGKILL (`faulted_pipeline`, tests/helpers_reliability.py `FAULTS`): each stage's command line is killed, with
  its whole process group, at a moment when it is writing; the stage is then run again. After the kill the
  final path is absent (first run) or holds the earlier version byte for byte (re-run); the re-run completes,
  leaves no temporary, equals an uninterrupted run, and holds every record once. Killed elsewhere already:
  the HDF5 writer during its first pass (test_hdf5_parallel), training after a checkpoint with the loss curve
  compared step by step (test_train_e2e), an HTTP download resumed from its `.part` (test_download_remote).
- Transient S3 errors: a loopback proxy in front of the moto server fails every third distinct request once
  (503 SlowDown, 500 InternalError, a body cut off half way); the `s3` source still arrives byte for byte, and
  `dvc push` / `dvc pull` through it restore the data byte for byte.
- A full disk: a small tmpfs holds the data folder; with it full, download, convert and hdf5 fail with an
  error naming the path being written and "no space left", earlier outputs stay byte for byte and no
  temporary is left; with space again, the same stages give the same bytes as before.
"""

from __future__ import annotations

import io
import json
import shutil
import uuid

import pytest

from llava_core.atomic import DiskFullError, partial_dir, replace_dir
from llava_core.data.convert import convert
from llava_core.data.hdf5_writer import build_hdf5
from llava_core.data.sources import download
from llava_core.params import load_config
from llava_core.training.observe import read_metrics
from tests.helpers_reliability import (
    FAULT_MODES,
    FAULTS,
    FlakyProxy,
    fault_figures,
    fill,
    hidden_leftovers,
    tmpfs,
    tree_digests,
)
from tests.helpers_unit import PROJECT, base_params, write_params

RELIABILITY_PAGE = PROJECT / "docs" / "reliability.md"  # where the figures below are quoted

FIRST_RUNS = {"download-first-run", "convert-first-run", "train-phase1", "train-phase2"}


# --- SIGKILL during each stage ------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("fault", list(FAULTS))
def test_sigkill_then_rerun_completes_with_nothing_lost(faulted_pipeline, fault):
    f = faulted_pipeline.facts[fault]
    assert f["exit"] == -9, FAULTS[fault]
    assert f["after_kill"] == ("absent" if fault in FIRST_RUNS else "intact"), FAULTS[fault]
    assert f["left_after_rerun"] == []
    assert f["identical"], f"{fault}: the re-run differs from an uninterrupted run"
    assert (f["found"], f["duplicated"]) == (f["expected"], 0), f"{fault}: records lost or repeated"


@pytest.mark.e2e
def test_the_reliability_page_quotes_these_figures(faulted_pipeline):
    f = fault_figures(faulted_pipeline.facts)
    print(f)
    assert (f["lost"], f["duplicated"]) == (0, 0)
    page = RELIABILITY_PAGE.read_text()
    assert f"{f['sigkills']} SIGKILLs in the faulted pipeline" in page
    assert f"{f['records']} records compared after the re-runs: 0 lost, 0 duplicated" in page


@pytest.mark.e2e
def test_training_resumes_from_the_last_complete_checkpoint(faulted_pipeline):
    p1, p2 = faulted_pipeline.facts["train-phase1"], faulted_pipeline.facts["train-phase2"]
    # phase 1 died inside the step-2 save: that half checkpoint is ignored, step 1 is where it went on from
    assert (p1["resume_point"], p1["resumed_from"]) == (1, 1)
    # phase 2 died after the step-2 save, with step 3 logged: step 3's record was dropped and trained again
    assert (p2["resume_point"], p2["resumed_from"]) == (2, 2)
    assert p1["steps"] == p2["steps"] == 4


@pytest.mark.e2e
def test_evaluation_resumes_the_judge_review_without_repeating_it(faulted_pipeline):
    f = faulted_pipeline.facts["evaluate-rerun"]
    assert f["reviews_kept"] == 2  # reviewed before the kill, kept in the partial file
    assert f["rerun_requests"] == f["questions"] - 2  # the re-run asked only for the others
    assert f["judge_saw_the_key"]  # the key from the environment reached the endpoint (and see test_security)


def test_a_metrics_line_cut_short_is_left_out_so_the_run_still_resumes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a metrics record"):
        read_metrics(path)


def test_a_version_set_aside_by_a_killed_rename_is_put_back(tmp_path):
    out = tmp_path / "phase2"
    out.mkdir()
    (out / "data.h5").write_bytes(b"v1")
    new = partial_dir(out)
    (new / "data.h5").write_bytes(b"v2")
    out.rename(out.with_name(".phase2.old"))  # replace_dir's first rename, then the kill
    tmp = partial_dir(out)  # the next run
    assert (out / "data.h5").read_bytes() == b"v1" and not out.with_name(".phase2.old").exists()
    (tmp / "data.h5").write_bytes(b"v3")
    replace_dir(tmp, out)
    assert (out / "data.h5").read_bytes() == b"v3"


# --- transient S3 errors --------------------------------------------------------------------------------------
@pytest.fixture
def flaky_bucket(s3_endpoint, aws_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = f"flaky-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    objects = {f"set/part-{i}.json": json.dumps({"i": i, "pad": "x" * 500 * i}).encode() for i in range(8)}
    objects["set/big.bin"] = bytes(range(256)) * (3 * 4096) + b"tail"  # 3 MiB + 4: fetched in 1 MiB ranges
    for key, data in objects.items():
        client.upload_fileobj(io.BytesIO(data), name, key)
    return name, objects


def _s3_source(tmp_path, bucket: str, endpoint: str, retries: int):
    params = base_params(tmp_path / "ws")
    params["sources"]["remote"] = {
        "kind": "s3",
        "location": f"s3://{bucket}/set",
        "options": {
            "endpoint_url": endpoint,
            "region": "us-east-1",
            "max_attempts": retries,  # botocore's retries config: attempts after the first
            "multipart_threshold": 1 << 20,
            "multipart_chunksize": 1 << 20,
            "max_concurrency": 2,
        },
    }
    return load_config(write_params(tmp_path, params))


def test_transient_s3_errors_are_retried_and_the_download_is_byte_identical(tmp_path, s3_endpoint, flaky_bucket):
    bucket, objects = flaky_bucket
    with FlakyProxy(s3_endpoint, every=3) as proxy:
        cfg = _s3_source(tmp_path, bucket, proxy.url, retries=3)
        result = download(cfg, "remote")
    raw = cfg.raw_dir("remote")
    assert {k.removeprefix("set/"): v for k, v in objects.items()} == {
        p.relative_to(raw).as_posix(): p.read_bytes() for p in raw.rglob("*") if p.name != "manifest.json"
    }
    assert result.files == len(objects) and hidden_leftovers(raw) == []
    failed = [key for _, key in proxy.failed]
    assert len(failed) == len(proxy.seen) // 3 and {mode for mode, _ in proxy.failed} == set(FAULT_MODES)
    assert set(failed) <= set(proxy.passed)  # every failed request was retried, and the retry went through
    figures = f"{len(failed)} of its {len(proxy.seen)} requests failed once"
    assert figures in RELIABILITY_PAGE.read_text(), figures


def test_without_retries_a_transient_s3_error_is_a_clear_error_and_nothing_is_published(
    tmp_path, s3_endpoint, flaky_bucket
):
    bucket, _ = flaky_bucket
    with FlakyProxy(s3_endpoint, every=1) as proxy:  # the first attempt of every request fails
        cfg = _s3_source(tmp_path, bucket, proxy.url, retries=0)
        with pytest.raises(Exception, match=r"when calling the ListObjectsV2 operation \(reached max retries: 0\)"):
            download(cfg, "remote")
    assert not cfg.raw_dir("remote").exists() and hidden_leftovers(cfg.raw_dir("remote")) == []


@pytest.mark.e2e  # DVC processes, as tests/orchestration/test_e2e_versioning.py's push and pull
def test_dvc_push_and_pull_through_transient_s3_errors_restore_byte_for_byte(tmp_path, venv_env, s3_endpoint, aws_env):
    import subprocess
    import sys

    import boto3

    bucket = f"dvc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for i in range(12):
        (repo / "data" / f"part-{i}.bin").write_bytes(bytes([i]) * 2000 * (i + 1))
    before = tree_digests(repo / "data")
    env = {**venv_env, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

    def dvc(*args: str) -> None:
        subprocess.run(list(args), cwd=repo, env=env, check=True, capture_output=True, text=True)

    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data"]):
        dvc(*cmd)
    with FlakyProxy(s3_endpoint, every=3) as proxy:
        dvc(sys.executable, str(PROJECT / "scripts/dvc_remote.py"), f"s3://{bucket}/cache", "--endpoint", proxy.url)
        dvc("dvc", "push", "-q")
        for wiped in (repo / ".dvc" / "cache", repo / "data"):
            shutil.rmtree(wiped)
        dvc("dvc", "pull", "-q")
    assert tree_digests(repo / "data") == before
    methods = {(key[0], mode) for mode, key in proxy.failed}
    assert {("PUT", "503 SlowDown"), ("GET", "body cut off")} <= methods  # both directions were hit
    figures = f"{len(proxy.failed)} of their {len(proxy.seen)} requests failed once"
    assert figures in RELIABILITY_PAGE.read_text(), figures


# --- a full disk --------------------------------------------------------------------------------------------
def _fails_for_lack_of_space(run, out, outputs: dict, before: dict) -> None:
    """`run` raises the named error; every earlier output is byte for byte as it was; no temporary is left."""
    partial = out.with_name(f".{out.name}.{'tmp' if out.suffix else 'partial'}")
    with pytest.raises(DiskFullError, match=rf"no space left on device while writing {partial}: {out} was not changed"):
        run()
    assert {s: tree_digests(p) for s, p in outputs.items()} == before, f"{out} or an earlier output changed"
    assert not partial.exists() and [n for n in hidden_leftovers(out) if n != ".filler"] == []


def test_a_full_disk_is_a_clear_error_and_earlier_outputs_survive(tmp_path):
    cfg = load_config(write_params(tmp_path, base_params(tmp_path / "ws")))
    two_workers = load_config(tmp_path / "params.yaml", {"hdf5": {"phase2": {"num_workers": 2}}})
    data = tmp_path / "ws" / "data"
    with tmpfs(data, "4m"):
        download(cfg, "synthetic_shapes")
        convert(cfg, "shapes_instruct")
        build_hdf5(cfg, "phase2")
        outputs = {
            "download": cfg.raw_dir("synthetic_shapes"),
            "convert": cfg.jsonl_path("shapes_instruct"),
            "hdf5": cfg.hdf5_dir("phase2"),
        }
        before = {stage: tree_digests(path) for stage, path in outputs.items()}
        shards = sum(p.stat().st_size for p in outputs["hdf5"].glob("data-*.h5"))
        stages = {
            "download": lambda: download(cfg, "synthetic_shapes", refetch=True),
            "convert": lambda: convert(cfg, "shapes_instruct"),
            # room for the first pass (the examples, about the shards' size) but not the second: HDF5's own writes
            # of the chunked shards would crash or leave a truncated file without an error (two worker processes)
            "hdf5": lambda: build_hdf5(two_workers, "phase2"),
        }
        for stage, run in stages.items():
            filler = fill(data, leave=int(1.5 * shards) if stage == "hdf5" else 0)
            _fails_for_lack_of_space(run, outputs[stage], outputs, before)
            filler.unlink()
        for stage, run in stages.items():  # space again: the same stages give the same bytes
            run()
            assert tree_digests(outputs[stage]) == before[stage], stage
