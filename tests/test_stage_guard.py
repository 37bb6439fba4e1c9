"""One run per output: the lock beside an output (a waiting run names the holder; a killed holder's lock is taken
over, and said so), and the stage guard (a run that waited for another which made the same version returns that
run's result; other settings run again). Real processes hold the locks; no timing is asserted."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from llava_core.atomic import lock_path, output_lock
from llava_core.data.sources import download
from llava_core.data.validate import SuiteResult, ValidationResult
from llava_core.params import load_config
from llava_core.pipeline import STAGES, stage
from llava_core.stage_guard import guarded, read_record, record_path, revive, run_guarded, settings_view
from tests.conftest import PROJECT
from tests.helpers_unit import base_params, write_params

DOWNLOAD = stage("download")
HOLDER = """
import sys, time
from llava_core.atomic import output_lock
with output_lock(sys.argv[1], "holder test"):
    print("held", flush=True)
    sys.stdin.readline()  # hold until told to release (or killed)
"""


def start_holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=PROJECT
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def wait_until(cond, what: str) -> None:
    done = threading.Event()
    for _ in range(6000):  # a loaded machine may take long; the condition is what is asserted, not the time
        if cond():
            return
        done.wait(0.05)
    raise AssertionError(f"never happened: {what}")


def test_a_second_run_waits_naming_the_holder_then_takes_the_lock(tmp_path):
    out = tmp_path / "data/hdf5/phase2"
    holder = start_holder(out)
    lines: list[str] = []
    got: dict = {}

    def waiter() -> None:
        with output_lock(out, "hdf5 phase2", log=lines.append, every_s=0.05) as wait:
            got["wait"] = wait
            got["holder_in_file"] = json.loads(lock_path(out).read_text())

    t = threading.Thread(target=waiter)
    t.start()
    wait_until(lambda: len(lines) >= 3, "the waiting run logs again and again")
    assert "wait" not in got  # still waiting: the holder has not let go
    holder.communicate("release\n")
    t.join()
    assert all(f"hdf5 phase2: waiting for {out}: held by holder test (pid {holder.pid} on " in m for m in lines)
    assert "-c" in lines[0] and "waited " in lines[-1]
    assert got["wait"].waited_s is not None and got["wait"].stale is None
    assert got["holder_in_file"]["pid"] == os.getpid() and got["holder_in_file"]["what"] == "hdf5 phase2"
    assert lock_path(out).read_text() == ""  # a clean release names nobody
    assert lock_path(out) == tmp_path / "data/hdf5/.phase2.lock"


def test_a_killed_holders_lock_is_taken_over_and_reported(tmp_path, caplog):
    out = tmp_path / "checkpoints/phase1"
    holder = start_holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    caplog.set_level(logging.WARNING, logger="llava_core")
    with output_lock(out, "train phase1") as wait:
        assert wait.waited_s is None  # the kernel released the dead holder's lock
        assert wait.stale is not None and wait.stale.pid == holder.pid and wait.stale.what == "holder test"
    assert f"train phase1: took over the lock of {out} from holder test (pid {holder.pid} on" in caplog.text
    assert "ended without releasing it (killed?)" in caplog.text
    with output_lock(out, "train phase1") as again:  # released cleanly this time: nothing stale
        assert again.stale is None


@pytest.fixture
def source_cfg(tmp_path):
    return load_config(write_params(tmp_path, base_params(tmp_path / "ws", num_pretrain=8, num_instruct=8)))


def test_a_run_that_waited_for_the_same_version_returns_its_result(source_cfg):
    cfg = source_cfg
    out = cfg.raw_dir("synthetic_shapes")
    results: dict = {}
    with guarded(cfg, DOWNLOAD, "synthetic_shapes") as first:
        assert first.current is None and first.wait.waited_s is None
        second = threading.Thread(
            target=lambda: results.update(second=run_guarded(DOWNLOAD, cfg, "synthetic_shapes", download))
        )
        second.start()
        wait_until(lambda: "synthetic_shapes" in lock_path(out).read_text(), "the first run holds the lock")
        results["first"] = download(cfg, "synthetic_shapes", refetch=True)  # the stage itself
        first.done(results["first"])
    second.join()
    assert results["second"] == results["first"] and isinstance(results["second"].path, Path)
    record = read_record(out)
    assert record["pid"] == os.getpid() and record["result"]["files"] == results["first"].files
    assert record_path(out) == out.parent / ".synthetic_shapes.run.json"

    # other settings: the waiting run runs (its fingerprint differs from the record's)
    other = cfg.model_copy(deep=True)
    other.sources["synthetic_shapes"].options["num_pretrain"] = 9
    with guarded(cfg, DOWNLOAD, "synthetic_shapes") as first:
        t = threading.Thread(
            target=lambda: results.update(other=run_guarded(DOWNLOAD, other, "synthetic_shapes", download))
        )
        t.start()
        wait_until(lambda: lock_path(out).read_text(), "the first run holds the lock")
    t.join()
    assert results["other"].skipped is False and results["other"].files != results["first"].files
    # a run that did not wait always runs: asking for a stage is asking for it to run
    t0 = time.time()
    with guarded(other, DOWNLOAD, "synthetic_shapes") as g:
        assert g.current is None
        g.done(download(other, "synthetic_shapes", refetch=True))
    # unless it waited elsewhere since before the output was made (a Dagster run queued for the gpu pool)
    with guarded(other, DOWNLOAD, "synthetic_shapes", since=t0) as g:
        assert g.current is not None and g.current["files"] == results["other"].files
    with guarded(other, DOWNLOAD, "synthetic_shapes", since=time.time()) as g:
        assert g.current is None


def test_fingerprint_settings_are_the_params_dvc_yaml_lists():
    """The fingerprint's settings of each stage are the params its dvc.yaml stage depends on: a change DVC re-runs a
    stage for also makes a waiting run redo it."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    cfg = load_config(PROJECT / "params.yaml")
    for s in STAGES:
        for key in s.keys(cfg):
            listed = stages[s.dvc_name(key)].get("params", [])
            assert list(settings_view(cfg, s, key)) == listed, s.dvc_name(key)
            assert listed, s.dvc_name(key)


def test_revive_rebuilds_nested_results(tmp_path):
    r = ValidationResult("phase1", tmp_path / "v.json", True, {"jsonl": SuiteResult("jsonl_phase1", True, 3, 0, 10)})
    data = json.loads(json.dumps(dataclasses.asdict(r), default=str))
    assert revive(ValidationResult, data) == r
