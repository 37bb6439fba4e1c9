"""Overlapping runs of one output, as real processes: two `llava-pipeline hdf5 phase2` and two `llava-pipeline train
phase1` started while the first holds the output's lock, and two Dagster runs (`dagster asset materialize`) of
`hdf5_phase2` on one instance. The second of each waits, saying which process holds the lock, then finds the
output made from the same inputs and settings and does not run again; both succeed and the output is whole.
(Before the locks, two `hdf5 phase2` a second apart both failed: each removed the other's `.phase2.partial`.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_core.artifacts import DATA_PARAMS, RUN_STATS, TRAIN_SUMMARY
from llava_core.atomic import lock_path
from llava_core.params import load_config
from llava_core.stage_guard import read_record
from tests.conftest import PROJECT, e2e_params

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A small workspace with the sources converted (the stages before those that overlap)."""
    params = e2e_params(tmp_path_factory.mktemp("overlap") / "ws")
    for args in (["download", "synthetic_shapes"], ["convert", "shapes_pretrain"], ["convert", "shapes_instruct"]):
        subprocess.run([BIN / "llava-pipeline", "--params", str(params), *args], check=True, capture_output=True)
    return params


def start(cmd: list, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_holder(out: Path, proc: subprocess.Popen) -> dict:
    """Until `proc` (or a process it started) holds the lock of `out`: what the lock file says of its holder."""
    for _ in range(12000):
        text = lock_path(out).read_text() if lock_path(out).exists() else ""
        if text:
            return json.loads(text)
        assert proc.poll() is None, f"{proc.args} ended before taking the lock"
        time.sleep(0.05)
    raise AssertionError(f"nobody took the lock of {out}")


def overlap(cmd: list, out: Path, tmp: Path, env: dict | None = None) -> tuple[str, str, dict]:
    """Start `cmd` twice, the second once the first holds the lock of `out`; both must succeed."""
    first = start(cmd, tmp / "first.log", env)
    holder = wait_for_holder(out, first)
    second = start(cmd, tmp / "second.log", env)
    assert first.wait() == 0, (tmp / "first.log").read_text()[-3000:]
    assert second.wait() == 0, (tmp / "second.log").read_text()[-3000:]
    return (tmp / "first.log").read_text(), (tmp / "second.log").read_text(), holder


def cli(params: Path, *args: str) -> list:
    return [str(BIN / "llava-pipeline"), "--params", str(params), *args]


def test_two_hdf5_runs_of_one_phase(workspace, tmp_path):
    cfg = load_config(workspace)
    out = cfg.hdf5_dir("phase2")
    first, second, holder = overlap(cli(workspace, "hdf5", "phase2"), out, tmp_path)
    assert holder["what"] == "hdf5 phase2" and "hdf5 phase2" in holder["command"]
    assert f"hdf5 phase2: waiting for {out}: held by hdf5 phase2 (pid {holder['pid']} on " in second
    assert "from the same inputs and settings while this run waited: up to date, not run again" in second
    assert "waiting for" not in first
    # the same result printed by both; the folder is whole, nothing temporary is left
    assert json.loads(first[first.index("{") :]) == json.loads(second[second.index("{") :])
    assert json.loads((out / DATA_PARAMS).read_text())["examples"] == 64
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".phase2")) == [
        ".phase2.lock",
        ".phase2.run.json",
    ]
    assert read_record(out)["pid"] == holder["pid"]


def test_two_trainings_of_one_phase(workspace, tmp_path):
    cfg = load_config(workspace)
    subprocess.run(cli(workspace, "hdf5", "phase1"), check=True, capture_output=True)
    out = cfg.checkpoint_dir("phase1")
    first, second, holder = overlap(cli(workspace, "train", "phase1"), out, tmp_path)
    assert f"train phase1: waiting for {out}: held by train phase1 (pid {holder['pid']} on " in second
    assert "up to date, not run again" in second and "[phase1] step" not in second  # it did not train
    summary = json.loads((out / TRAIN_SUMMARY).read_text())
    summary.update(json.loads((out / RUN_STATS).read_text()))  # the result joins the run's figures, as finished()
    assert summary["steps"] == 4 and json.loads(second[second.index("{") :])["summary"] == summary
    assert not (out.parent / ".phase1.partial").exists()


def test_two_dagster_runs_of_one_asset(workspace, tmp_path):
    """Two `dagster asset materialize` processes on one instance: both runs succeed, the second's event log says
    whom it waited for, and both record the same data version."""
    import dagster as dg

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(PROJECT / "configs/dagster/dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "LLAVA_PARAMS": str(workspace),
        "LLAVA_EXECUTOR": "in_process",
    }
    cmd = [str(BIN / "dagster"), "asset", "materialize", "--select", "hdf5_phase2", "-m", "orchestration.definitions"]
    out = load_config(workspace).hdf5_dir("phase2")
    _, _, holder = overlap(cmd, out, tmp_path, env)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        logs = {r.run_id: [e.user_message for e in instance.all_logs(r.run_id)] for r in runs}
        # the second run waits for the HDF5 folder (the first may then wait for the second's validation: its gate
        # runs after the HDF5 step, and the second, finding the folder up to date, can reach the gate first)
        waited = [rid for rid, msgs in logs.items() if any(f"hdf5 phase2: waiting for {out}:" in m for m in msgs)]
        assert len(waited) == 1, logs
        assert any(f"held by hdf5 phase2 (pid {holder['pid']} on" in m for m in logs[waited[0]])
        assert any("up to date, not run again" in m for m in logs[waited[0]])
        mats = instance.fetch_materializations(dg.AssetKey("hdf5_phase2"), limit=5).records
        versions = {m.asset_materialization.tags["dagster/data_version"] for m in mats}
        assert len(mats) == 2 and len(versions) == 1
        made_by = {m.asset_materialization.metadata["made_by"].value for m in mats}
        assert len(made_by) == 1 and f"pid {holder['pid']} " in made_by.pop()  # the first run made it
    assert json.loads((out / DATA_PARAMS).read_text())["examples"] == 64
