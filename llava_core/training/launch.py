"""Stage 4's launcher: the `accelerate launch -m llava_core.training.recipe` command of a phase, its preflight
(devices and the memory plan, before the training process starts), run here or submitted to SLURM, and read back.

This module imports no torch: the CLI (`llava-pipeline train`, what DVC runs), `llava-pipeline all` and the
Dagster training assets only start the training process, which imports what it needs (`llava_core.training.recipe`).
`python -m llava_core.training.launch` is what a SLURM job runs on each of its machines (`llava_core.training.slurm`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from llava_core.artifacts import PREEMPTED, RUN_STATS, TRAIN_SUMMARY
from llava_core.atomic import write_json_atomic
from llava_core.config import PipelineConfig
from llava_core.phases import PHASE_NAMES, get_phase
from llava_core.training.checkpointing import work_dir
from llava_core.training.devices import (
    LaunchConfig,
    LaunchRefused,
    check_devices,
    read_launch_config,
    torch_build,
    visible_gpus,
)
from llava_core.training.memory import MemoryPlan, check_fits, plan_for


@dataclass
class TrainResult:
    phase: str
    path: Path
    steps: int
    final_loss: float
    summary: dict


@dataclass(frozen=True)
class Machines:
    """accelerate's multi-machine settings for one launch; each one set overrides the accelerate config's."""

    num_machines: int | None = None
    machine_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None
    rdzv_backend: str | None = None

    def args(self) -> list[str]:
        out = []
        for name, value in (
            ("num_machines", self.num_machines),
            ("machine_rank", self.machine_rank),
            ("main_process_ip", self.main_process_ip),
            ("main_process_port", self.main_process_port),
            ("rdzv_backend", self.rdzv_backend),
        ):
            if value is not None:
                out += [f"--{name}", str(value)]
        return out


def spec_path(cfg: PipelineConfig, phase: str) -> Path:
    out = cfg.checkpoint_dir(phase)
    return out.parent / f".{phase}.launch.json"


def write_spec(cfg: PipelineConfig, phase: str) -> Path:
    """The resolved config the training process reads, beside the checkpoints."""
    spec = spec_path(cfg, phase)
    spec.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec, {**cfg.to_dict(), "base_dir": str(cfg.base_dir)})
    return spec


def read_spec(path: Path) -> PipelineConfig:
    from llava_core.params import config_from_dict

    raw = json.loads(Path(path).read_text())
    base = Path(raw.pop("base_dir"))
    return config_from_dict(raw, base)


def launch_command(
    cfg: PipelineConfig, phase: str, num_processes: int | None = None, machines: Machines | None = None
) -> list[str]:
    """The `accelerate launch` command of one phase (its resolved config written beside the checkpoints)."""
    return accelerate_command(cfg, phase, write_spec(cfg, phase), num_processes, machines)


def accelerate_command(
    cfg: PipelineConfig, phase: str, spec: Path, num_processes: int | None, machines: Machines | None
) -> list[str]:
    tc = cfg.train[get_phase(phase).name]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg.resolve_file(tc.accelerate_config)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    cmd += (machines or Machines()).args()
    return cmd + ["-m", "llava_core.training.recipe", "--config-json", str(spec), "--phase", phase]


def launch_config(
    cfg: PipelineConfig, phase: str, num_processes: int | None = None, machines: Machines | None = None
) -> LaunchConfig:
    """The phase's accelerate config with this launch's process and machine counts."""
    launch = read_launch_config(cfg.resolve_file(cfg.train[phase].accelerate_config))
    return launch.with_processes(num_processes, (machines or Machines()).num_machines)


def preflight(
    cfg: PipelineConfig, phase: str, num_processes: int | None = None, machines: Machines | None = None
) -> MemoryPlan:
    """Refuse (`LaunchRefused`, naming the accelerate config) a launch this machine cannot run: GPUs named where
    there are none, more processes than GPUs, a memory plan larger than the GPUs; return the plan."""
    launch = launch_config(cfg, phase, num_processes, machines)
    if launch.num_machines > 1 and not ((machines and machines.main_process_ip) or launch.main_process_ip):
        raise LaunchRefused(
            f"accelerate config {launch.path}: {launch.num_machines} machines need the main machine's address "
            "(main_process_ip in the config, or --main-process-ip)"
        )
    gpus = visible_gpus() if launch.uses_gpus else []
    check_devices(launch, gpus, torch_build())
    plan = plan_for(cfg, phase, num_processes, launch.num_machines)
    check_fits(plan, gpus, launch)
    return plan


# The training process's numbers must not depend on how busy the machine is: OpenMP and MKL may otherwise pick
# fewer threads when other work runs (dynamic adjustment), which changes how sums are split and so the low bits
# of every step. A user's own setting wins.
DETERMINISTIC_THREADS = {"OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"}


def launch_env() -> dict[str, str]:
    return {**DETERMINISTIC_THREADS, **os.environ, "PYTHONUNBUFFERED": "1"}


class TrainingStopped(RuntimeError):
    """The training process got SIGTERM and stopped after saving a resume point (a restart continues from it)."""


def finished(cfg: PipelineConfig, phase: str) -> TrainResult:
    """The result of a completed phase, read from its checkpoint folder (`TrainingStopped` if SIGTERM ended it)."""
    marker = work_dir(cfg, phase) / PREEMPTED
    if marker.is_file():
        step = json.loads(marker.read_text())["step"]
        raise TrainingStopped(
            f"training {phase} was stopped by SIGTERM after step {step}; its resume point is saved in "
            f"{work_dir(cfg, phase)}: run it again to continue"
        )
    out = cfg.checkpoint_dir(phase)
    summary = json.loads((out / TRAIN_SUMMARY).read_text())
    if (out / RUN_STATS).is_file():
        summary.update(json.loads((out / RUN_STATS).read_text()))
    spec_path(cfg, phase).unlink(missing_ok=True)
    return TrainResult(phase, out, summary["steps"], summary["final_loss"], summary)


def train(
    cfg: PipelineConfig,
    phase: str,
    num_processes: int | None = None,
    machines: Machines | None = None,
    checked: bool = False,
) -> TrainResult:
    """Stage function: run one phase under `accelerate launch` on this machine and return its summary
    (`launcher: slurm` runs are `llava_core.training.slurm.run_job`'s; the stage runner picks). `checked`: the
    caller has already run `preflight` (before taking the output's lock: a refused launch writes nothing)."""
    if not checked:
        preflight(cfg, phase, num_processes, machines)
    cmd = launch_command(cfg, phase, num_processes, machines)
    proc = subprocess.run(cmd, env=launch_env())
    if proc.returncode != 0:
        raise RuntimeError(f"training {phase} failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    return finished(cfg, phase)


# --- on a machine of a SLURM job ----------------------------------------------------------------------------------
def finished_before_requeue(cfg: PipelineConfig, phase: str) -> bool:
    """Whether this is a requeued job whose training had already written its finished checkpoint (a preemption
    or the time limit's signal that came after the last step): the checkpoint's run_stats name this job."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SLURM_RESTART_COUNT", "0") in ("", "0"):
        return False
    out = cfg.checkpoint_dir(phase)
    try:
        stats = json.loads((out / RUN_STATS).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stats.get("slurm_job_id") == job and (out / TRAIN_SUMMARY).is_file()


def node_main(argv: list[str] | None = None) -> int:
    """One machine's launch inside a SLURM job (`srun`, one task per machine): preflight on this machine, then
    `accelerate launch` with the job's machine count, this machine's rank and the first machine's address.

    SIGTERM (preemption, the time limit's `--signal`, `scontrol requeue`) is for the training processes, which save
    a checkpoint at their next step: this process and torchrun ignore it and wait for them to finish.
    """
    ap = argparse.ArgumentParser(description="One machine's part of a SLURM training job.")
    ap.add_argument("--config-json", required=True, type=Path)
    ap.add_argument("--phase", required=True, choices=PHASE_NAMES)
    ap.add_argument("--main-process-ip", required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by accelerate's launcher (exec keeps SIG_IGN)
    cfg = read_spec(args.config_json)
    if finished_before_requeue(cfg, args.phase):
        job = os.environ["SLURM_JOB_ID"]
        print(f"[slurm] {args.phase} finished before job {job} was requeued: nothing to train again", flush=True)
        return 0
    sc = cfg.train[args.phase].slurm
    nodes, rank = int(os.environ.get("SLURM_NNODES", "1")), int(os.environ.get("SLURM_NODEID", "0"))
    machines = Machines(nodes, rank, args.main_process_ip) if nodes > 1 else None
    processes = nodes * sc.gpus_per_node if sc.gpus_per_node else None
    try:
        preflight(cfg, args.phase, processes, machines)
    except Exception as e:  # the job's log shows why, and the submitter reports the job's failure
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    cmd = accelerate_command(cfg, args.phase, args.config_json, processes, machines)
    # torchrun would answer SIGTERM by stopping its workers: let them save and end by themselves
    env = {**launch_env(), "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT"}
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(node_main())
