"""Stage 4's launcher: the `accelerate launch -m llava_core.training.recipe` command of a phase, run and read back.

This module imports no torch: the CLI (`llava-pipeline train`, what DVC runs), `llava-pipeline all` and the
Dagster training assets only start the training process, which imports what it needs (`llava_core.training.recipe`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from llava_core.artifacts import RUN_STATS, TRAIN_SUMMARY
from llava_core.atomic import write_json_atomic
from llava_core.config import PipelineConfig
from llava_core.phases import get_phase


@dataclass
class TrainResult:
    phase: str
    path: Path
    steps: int
    final_loss: float
    summary: dict


def launch_command(cfg: PipelineConfig, phase: str, num_processes: int | None = None) -> list[str]:
    """The `accelerate launch` command of one phase (its resolved config written beside the checkpoints)."""
    tc = cfg.train[get_phase(phase).name]
    out = cfg.checkpoint_dir(phase)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = out.parent / f".{phase}.launch.json"
    write_json_atomic(spec, {**cfg.to_dict(), "base_dir": str(cfg.base_dir)})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg.resolve_file(tc.accelerate_config)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    return cmd + ["-m", "llava_core.training.recipe", "--config-json", str(spec), "--phase", phase]


# The training process's numbers must not depend on how busy the machine is: OpenMP and MKL may otherwise pick
# fewer threads when other work runs (dynamic adjustment), which changes how sums are split and so the low bits
# of every step. A user's own setting wins.
DETERMINISTIC_THREADS = {"OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"}


def launch_env() -> dict[str, str]:
    return {**DETERMINISTIC_THREADS, **os.environ, "PYTHONUNBUFFERED": "1"}


def finished(cfg: PipelineConfig, phase: str) -> TrainResult:
    """The result of a completed phase, read from its checkpoint folder (the summary with the run's figures)."""
    out = cfg.checkpoint_dir(phase)
    summary = json.loads((out / TRAIN_SUMMARY).read_text())
    if (out / RUN_STATS).is_file():
        summary.update(json.loads((out / RUN_STATS).read_text()))
    (out.parent / f".{phase}.launch.json").unlink(missing_ok=True)
    return TrainResult(phase, out, summary["steps"], summary["final_loss"], summary)


def train(cfg: PipelineConfig, phase: str, num_processes: int | None = None) -> TrainResult:
    """Stage function: run one phase under `accelerate launch` and return its summary."""
    cmd = launch_command(cfg, phase, num_processes)
    proc = subprocess.run(cmd, env=launch_env())
    if proc.returncode != 0:
        raise RuntimeError(f"training {phase} failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    return finished(cfg, phase)
