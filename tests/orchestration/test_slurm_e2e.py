"""Training as SLURM jobs on a real one-machine cluster (munge, slurmctld, slurmd on loopback; skipped, with the
reason, where it cannot start): both phases from the CLI and from a Dagster materialisation, a preempted job that
saves a checkpoint and resumes from it when requeued, and the cancels (Ctrl-C on the CLI, a terminated Dagster run)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
from safetensors.torch import load_file

from assets.train import checkpoint_key
from llava_core.artifacts import PREEMPTED
from llava_core.params import load_config
from llava_core.training.checkpointing import step_checkpoints, work_dir
from llava_core.training.launch import spec_path
from llava_core.training.observe import read_metrics
from llava_core.training.slurm import job_dir
from orchestration.definitions import build_assets
from orchestration.resources import PipelineSettings
from tests.helpers_launch import STEPPED, cli, held_between_steps, interruptible, wait_for, workspace
from tests.helpers_unit import PROJECT

pytestmark = pytest.mark.e2e

# every sbatch setting the cluster can honour: partition, CPUs, time limit, account (accounting off: recorded only)
JOB = {"partition": "debug", "cpus_per_task": 1, "time_limit": "30:00", "account": "llava", "signal_grace_s": 60}
ON_SLURM = {"launcher": "slurm", "slurm": JOB}


def _params(folder: Path, data: Path) -> Path:
    return workspace(folder, data, phase1={**STEPPED, **ON_SLURM}, phase2={"log_every": 1, **ON_SLURM})


def _job_id(cfg, phase: str) -> str | None:
    logs = sorted(job_dir(cfg).glob(f"{phase}-*.out"))
    return logs[-1].stem.split("-")[1] if logs else None


def test_cluster_script_is_idempotent(slurm_cluster):
    """`make slurm-up` on a running cluster leaves it as it is (same daemons, same configuration)."""
    script = [sys.executable, str(PROJECT / "scripts" / "slurm_cluster.py")]
    pids = sorted(p.read_text() for p in (slurm_cluster.dir / "run").glob("*.pid"))
    again = subprocess.run([*script, "up", "--dir", str(slurm_cluster.dir)], capture_output=True, text=True)
    assert again.returncode == 0 and f"export SLURM_CONF={slurm_cluster.info['SLURM_CONF']}" in again.stdout
    assert sorted(p.read_text() for p in (slurm_cluster.dir / "run").glob("*.pid")) == pids and len(pids) == 3
    state = subprocess.run(
        [*script, "status", "--dir", str(slurm_cluster.dir), "--json"], capture_output=True, text=True
    )
    assert json.loads(state.stdout)["state"] in ("idle", "mix", "alloc")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, train_data, slurm_cluster):
    """Both phases submitted from the CLI, one after the other: (params, each phase's stderr)."""
    params = _params(tmp_path_factory.mktemp("slurm_cli"), train_data)
    errs = {}
    for phase in ("phase1", "phase2"):
        proc = cli(params, "train", phase, env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, errs[phase] = proc.communicate(timeout=1200)
        assert proc.returncode == 0, errs[phase][-3000:]
    return params, errs


def test_cli_trains_both_phases_as_slurm_jobs(cli_run, slurm_cluster):
    params, errs = cli_run
    cfg = load_config(params)
    for phase, steps in (("phase1", 8), ("phase2", 4)):
        summary = json.loads((cfg.checkpoint_dir(phase) / "train_summary.json").read_text())
        stats = json.loads((cfg.checkpoint_dir(phase) / "run_stats.json").read_text())  # how the run went
        job = _job_id(cfg, phase)
        assert summary["steps"] == steps and (stats["resumed_from_step"], stats["slurm_job_id"]) == (None, job)
        # the job's log streams to the submitter while it runs
        assert f"[slurm] {phase}: job {job} submitted" in errs[phase]
        assert f"[{phase}] step {steps} loss" in errs[phase]
        assert f"[{phase}] step {steps} loss" in (job_dir(cfg) / f"{phase}-{job}.out").read_text()
    script = (job_dir(cfg) / "phase1.sbatch").read_text()
    assert "#SBATCH --partition=debug" in script and "#SBATCH --account=llava" in script
    assert not slurm_cluster.jobs()  # nothing left queued or running


def test_dagster_runs_both_phases_on_slurm_and_a_preempted_job_resumes(tmp_path, cli_run, train_data, slurm_cluster):
    """Phase 1 is preempted by a job of the `urgent` partition (PreemptMode=REQUEUE): SIGTERM, a checkpoint at the
    next step, requeued, resumed; its weights are those of the uninterrupted CLI run of the same settings."""
    params = _params(tmp_path / "ws", train_data)
    cfg = load_config(params)
    metrics = work_dir(cfg, "phase1") / "metrics.jsonl"

    def preempt() -> None:  # once 3 steps are logged: a job that needs every CPU of the node
        wait_for("third step", lambda: len(read_metrics(metrics)) >= 3, timeout=900)
        with held_between_steps(spec_path(cfg, "phase1")):
            urgent = ("sbatch", "-p", "urgent", "-c", str(os.cpu_count()), "-o", "/dev/null", "--wrap", "sleep 1")
            slurm_cluster.run(*urgent)

    (tmp_path / "home").mkdir()
    thread = threading.Thread(target=preempt, daemon=True)
    os.environ["SLURM_CONF"] = slurm_cluster.env["SLURM_CONF"]
    try:
        thread.start()
        with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
            result = dg.materialize(
                build_assets(cfg),
                selection=[checkpoint_key("phase1"), checkpoint_key("phase2")],
                instance=instance,
                resources={"settings": PipelineSettings(params_path=str(params))},
            )
            logs = [e.user_message for e in instance.all_logs(result.run_id)]
    finally:
        os.environ.pop("SLURM_CONF")
    thread.join(timeout=5)
    assert result.success
    log_text = "\n".join(logs)
    assert "DUE TO PREEMPTION" in log_text  # the job's own log, followed into the run
    stopped = int(re.search(r"\[phase1\] stopped by SIGTERM after step (\d+)", log_text).group(1))  # through Pipes
    assert f"[phase1] resumed from step-{stopped:08d}" in log_text
    meta = {
        m.asset_key: m.event_specific_data.materialization.metadata for m in result.get_asset_materialization_events()
    }
    p1 = meta[checkpoint_key("phase1")]
    assert (p1["steps"].value, p1["resumed_from_step"].value) == (8, stopped)
    assert p1["pipes_metrics_records"].value == 8  # each step once: before the preemption and after the requeue
    assert "single over 1 process(es)" in p1["memory_plan"].value and p1["memory_plan_gib_per_process"].value > 0
    assert meta[checkpoint_key("phase2")]["steps"].value == 4
    ref = load_config(cli_run[0])
    for phase in ("phase1", "phase2"):
        a = load_file(str(ref.checkpoint_dir(phase) / "model.safetensors"))
        b = load_file(str(cfg.checkpoint_dir(phase) / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=f"{phase} {k}")


def test_a_job_signalled_like_at_its_time_limit_requeues_itself_and_resumes(
    tmp_path, cli_run, train_data, slurm_cluster
):
    """`scancel --signal=TERM` (what `--signal=TERM@<grace>` does before the time limit): the training saves and stops,
    the job script requeues the still-running job, which resumes; the CLI waits through it."""
    cfg = load_config(params := _params(tmp_path / "ws", train_data))
    proc = cli(params, "train", "phase1", env=slurm_cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    job = wait_for("job", lambda: _job_id(cfg, "phase1"), proc=proc)
    wait_for("second step", lambda: len(read_metrics(work_dir(cfg, "phase1") / "metrics.jsonl")) >= 2, proc=proc)
    with held_between_steps(spec_path(cfg, "phase1")):
        slurm_cluster.run("scancel", "--signal=TERM", job)
    err = proc.communicate(timeout=900)[1]
    assert proc.returncode == 0, err[-3000:]
    assert f"[slurm] requeueing job {job}: it resumes from the checkpoint" in err
    stopped = int(re.search(r"\[phase1\] stopped by SIGTERM after step (\d+)", err).group(1))
    summary = json.loads((cfg.checkpoint_dir("phase1") / "train_summary.json").read_text())
    stats = json.loads((cfg.checkpoint_dir("phase1") / "run_stats.json").read_text())
    assert (summary["steps"], stats["resumed_from_step"]) == (8, stopped)
    ref = load_file(str(load_config(cli_run[0]).checkpoint_dir("phase1") / "model.safetensors"))
    got = load_file(str(cfg.checkpoint_dir("phase1") / "model.safetensors"))
    for k in ref:
        torch.testing.assert_close(ref[k], got[k], rtol=1e-6, atol=1e-7, msg=k)


def test_ctrl_c_on_the_cli_cancels_its_job(tmp_path, train_data, slurm_cluster):
    cfg = load_config(params := _params(tmp_path / "ws", train_data))
    proc = cli(params, "train", "phase1", env=slurm_cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    job = wait_for("job", lambda: _job_id(cfg, "phase1"), proc=proc)
    wait_for("running job", lambda: slurm_cluster.job_state(job) == "RUNNING", proc=proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert wait_for("cancelled job", lambda: slurm_cluster.job_state(job) in ("CANCELLED", None), timeout=120)
    assert job not in slurm_cluster.jobs() or slurm_cluster.job_state(job) == "CANCELLED"


def test_terminating_the_dagster_run_cancels_the_job(tmp_path, train_data, slurm_cluster):
    """`dagster asset materialize` (the multiprocess executor, a step process) interrupted as Dagster terminates a
    run (SIGINT to the run's process): the job is cancelled, its training saved a resume point, nothing requeues."""
    cfg = load_config(params := _params(tmp_path / "ws", train_data))
    home = tmp_path / "home"
    home.mkdir()
    env = {**slurm_cluster.env, "DAGSTER_HOME": str(home), "LLAVA_PARAMS": str(params)}
    dagster = str(Path(sys.executable).parent / "dagster")
    proc = subprocess.Popen(
        [dagster, "asset", "materialize", "-m", "orchestration.definitions", "--select", "checkpoint_phase1"],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    job = wait_for("job", lambda: _job_id(cfg, "phase1"), proc=proc)
    wait_for("a logged step", lambda: read_metrics(work_dir(cfg, "phase1") / "metrics.jsonl"), proc=proc)
    with held_between_steps(spec_path(cfg, "phase1")):  # the cancel's SIGTERM lands before the last step
        proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode != 0, err[-3000:]
    assert wait_for("cancelled job", lambda: slurm_cluster.job_state(job) == "CANCELLED", timeout=120)
    time.sleep(3)  # a requeue would show as PENDING
    assert slurm_cluster.job_state(job) in ("CANCELLED", None) and job not in slurm_cluster.jobs()
    assert step_checkpoints(work_dir(cfg, "phase1"))  # the SIGTERM of the cancel saved a resume point
    assert (work_dir(cfg, "phase1") / PREEMPTED).is_file()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
