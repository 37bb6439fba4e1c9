"""A training phase as a SLURM job (`train.<phase>.launcher: slurm`): its batch script, `sbatch --wait`, its log
followed while it runs, `scancel` when the submitter is interrupted, and the requeue after a preemption.

The job runs `python -m llava_core.training.launch` once per machine (`srun`, one task each), which checks the
machine and starts `accelerate launch` there. The project folder, its virtualenv and the workspace must be at
the same paths on the machines (a shared filesystem), as on most clusters. On SIGTERM (preemption, the time limit's
`--signal=TERM@<grace>`, `scontrol requeue`) the training saves a checkpoint at its next step and leaves a marker;
the script then requeues a job that is still running (a time limit, `scancel --signal=TERM`), and the requeued job
resumes from the checkpoint. `sbatch --wait` waits through requeues, for the job's final state. No dagster here:
the Dagster asset runs the same job inside a Pipes session (assets/train.py), whose environment `sbatch` hands on.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llava_core.artifacts import PREEMPTED, SLURM_DIR
from llava_core.config import PipelineConfig
from llava_core.training.checkpointing import work_dir
from llava_core.training.devices import LaunchRefused
from llava_core.training.launch import TrainResult, finished, launch_env, write_spec
from llava_core.training.memory import plan_for

log = logging.getLogger("llava_core.training")


def job_dir(cfg: PipelineConfig) -> Path:
    """checkpoints/.slurm/: the job scripts, their logs and the Dagster Pipes message files."""
    return cfg.path("checkpoints") / SLURM_DIR


def _sbatch_options(cfg: PipelineConfig, phase: str, log_pattern: Path) -> list[str]:
    sc = cfg.train[phase].slurm
    opts = [
        f"--job-name=llava-{phase}",
        f"--nodes={sc.nodes}",
        "--ntasks-per-node=1",  # one accelerate launch per machine; it starts the processes
        f"--output={log_pattern}",
        "--open-mode=append",  # a requeued run continues the same log
        f"--signal=TERM@{sc.signal_grace_s}",
        "--requeue" if sc.requeue else "--no-requeue",
    ]
    for flag, value in (
        ("partition", sc.partition),
        ("gpus-per-node", sc.gpus_per_node or None),
        ("cpus-per-task", sc.cpus_per_task),
        ("time", sc.time_limit),
        ("account", sc.account),
    ):
        if value is not None:
            opts.append(f"--{flag}={value}")
    return opts + list(sc.extra_args)


def job_script(cfg: PipelineConfig, phase: str, spec: Path, log_pattern: Path) -> str:
    """The batch script of one phase's job."""
    sc = cfg.train[phase].slurm
    q = shlex.quote
    marker = q(str(work_dir(cfg, phase) / PREEMPTED))
    launch = [
        sys.executable,
        "-m",
        "llava_core.training.launch",
        "--config-json",
        str(spec.resolve()),
        "--phase",
        phase,
    ]
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in _sbatch_options(cfg, phase, log_pattern))]
    lines += [
        f"# llava-pipeline: training {phase} (launcher: slurm). docs/gpus-and-clusters.md",
        # bash runs the trap once srun returns: the training saves first, then this script decides
        "trap 'echo \"[slurm] SIGTERM: the training saves a checkpoint at its next step\"' TERM",
        f"cd {q(str(cfg.base_dir.resolve()))}",
        f"rm -f {marker}",
        *sc.setup,
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'srun --kill-on-bad-exit=1 {" ".join(q(a) for a in launch)} --main-process-ip "$head"',
        "status=$?",
    ]
    if sc.requeue:  # stopped by a signal while the job still runs (time limit, scancel --signal=TERM): requeue it;
        # a preemption or `scontrol requeue` requeues it already, a cancelled job stays cancelled
        lines += [
            f"if [ -f {marker} ]; then",
            "  state=$(scontrol show job \"$SLURM_JOB_ID\" -o | sed -n 's/.*JobState=\\([A-Z_]*\\).*/\\1/p')",
            '  if [ "$state" = RUNNING ]; then',
            '    echo "[slurm] requeueing job $SLURM_JOB_ID: it resumes from the checkpoint"',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "  fi",
            "fi",
        ]
    lines.append("exit $status")
    return "\n".join(lines) + "\n"


class LogFollower:
    """The complete lines added to a file since the last call (the job's log, while it runs)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.rest = Path(path), 0, ""

    def lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        *done, self.rest = (self.rest + text).split("\n")
        return done


@dataclass
class SlurmJob:
    """One phase's job: `submit`, `wait` (following its log), `cancel`."""

    cfg: PipelineConfig
    phase: str
    job_id: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def script_path(self) -> Path:
        return job_dir(self.cfg) / f"{self.phase}.sbatch"

    @property
    def log_path(self) -> Path:
        return job_dir(self.cfg) / f"{self.phase}-{self.job_id}.out"

    def submit(self, env: dict[str, str] | None = None) -> str:
        """Check what can be checked here, write the script, start `sbatch --wait`; returns the job id."""
        if shutil.which("sbatch") is None:
            raise LaunchRefused(f"train.{self.phase}.launcher is slurm, and SLURM's sbatch is not on PATH here")
        plan_for(self.cfg, self.phase)  # the accelerate config and the architecture resolve (the GPUs are the nodes')
        folder = job_dir(self.cfg)
        folder.mkdir(parents=True, exist_ok=True)
        spec = write_spec(self.cfg, self.phase)
        pattern = folder.resolve() / f"{self.phase}-%j.out"
        self.script_path.write_text(job_script(self.cfg, self.phase, spec, pattern))
        self.proc = subprocess.Popen(
            ["sbatch", "--wait", "--parsable", str(self.script_path)],
            env={**launch_env(), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = self.proc.stdout.readline().strip()  # --parsable: "<job id>[;cluster]", printed on submission
        if not first:
            err = self.proc.communicate()[1].strip()
            raise RuntimeError(f"sbatch refused the {self.phase} job ({self.script_path}): {err}")
        self.job_id = first.split(";")[0]
        return self.job_id

    def wait(self, emit: Callable[[str], None], poll_s: float = 1.0) -> int:
        """Follow the job's log until `sbatch --wait` returns (the job's final state); its exit status."""
        follower = LogFollower(self.log_path)
        while self.proc.poll() is None:
            for line in follower.lines():
                emit(line)
            time.sleep(poll_s)
        for line in follower.lines() + ([follower.rest] if follower.rest else []):
            emit(line)
        return self.proc.returncode

    def cancel(self) -> None:
        """scancel the job (its training saves a checkpoint on the SIGTERM and does not requeue)."""
        if self.job_id is not None:
            subprocess.run(["scancel", self.job_id], capture_output=True)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()

    def state(self) -> str | None:
        """The job's state as slurmctld knows it (None once it forgot the job)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", str(self.job_id)], capture_output=True, text=True)
        for item in out.stdout.split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
        return None


def run_job(cfg: PipelineConfig, phase: str, env: dict[str, str] | None = None, emit=None) -> TrainResult:
    """Submit the phase's job and wait for it (following its log); cancel it when interrupted (Ctrl-C, SIGTERM)."""
    emit = emit or (lambda line: log.info(line))
    job = SlurmJob(cfg, phase)
    previous = signal.getsignal(signal.SIGTERM)
    if threading_main():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        job.submit(env)
        emit(f"[slurm] {phase}: job {job.job_id} submitted ({job.script_path}); log: {job.log_path}")
        status = job.wait(emit)
    except BaseException:
        job.cancel()
        raise
    finally:
        if threading_main():
            signal.signal(signal.SIGTERM, previous)
    if status != 0:
        raise RuntimeError(f"SLURM job {job.job_id} ({phase}) failed: sbatch --wait exit {status}; log {job.log_path}")
    return finished(cfg, phase)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
