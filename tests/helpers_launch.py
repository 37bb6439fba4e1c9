"""Shared by the launch tests: one workspace of built HDF5 data for both phases, params files that train from it
into their own checkpoint folders, and the one-machine SLURM cluster (scripts/slurm_cluster.py) on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import e2e_params
from tests.helpers_unit import PROJECT

# 64 records, micro-batch 4, 2 micro-batches per step: 8 steps in phase 1; a checkpoint every 3 steps
STEPPED = {"global_batch_size": 8, "micro_batch_size": 4, "log_every": 1, "save_every": 3}
CLUSTER_SCRIPT = PROJECT / "scripts" / "slurm_cluster.py"


def build_data(root: Path) -> Path:
    """The small source downloaded, converted and packed for both phases under `root`."""
    from llava_core.params import load_config

    build_phases(load_config(e2e_params(root, root=str(root))))
    return root


def build_phases(cfg) -> None:
    """Download, convert and pack both phases of `cfg`'s workspace through the stage table's runners."""
    from llava_core import pipeline

    pipeline.run_download(cfg, "synthetic_shapes")
    for name in cfg.datasets:
        pipeline.run_convert(cfg, name)
    for phase in ("phase1", "phase2"):
        pipeline.run_hdf5(cfg, phase)


def workspace(folder: Path, data_root: Path, **phases: dict) -> Path:
    """A params file reading `data_root`'s data and training into `folder/checkpoints`; `phases` override
    train.<phase> settings."""
    params = e2e_params(folder, root=str(data_root))
    raw = yaml.safe_load(params.read_text())
    raw["workspace"]["checkpoints"] = str(folder / "checkpoints")
    for phase, values in phases.items():
        raw["train"][phase].update(values)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    return params


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(params: Path, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """`llava-pipeline --params <params> <args>` started in the background."""
    exe = str(Path(sys.executable).parent / "llava-pipeline")
    return subprocess.Popen([exe, "--params", str(params), *args], env=env or os.environ.copy(), text=True, **kw)


class SlurmCluster:
    """The cluster of scripts/slurm_cluster.py in a folder of its own; `env` points SLURM's commands at it."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        out = subprocess.run(
            [sys.executable, str(CLUSTER_SCRIPT), "up", "--dir", str(folder), "--json"], capture_output=True, text=True
        )
        self.returncode, self.error = out.returncode, out.stderr.strip()
        self.info = json.loads(out.stdout) if out.returncode == 0 else {}

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": self.info["SLURM_CONF"]}

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=120)

    def job_state(self, job_id: str) -> str | None:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return next((w.split("=", 1)[1] for w in out.stdout.split() if w.startswith("JobState=")), None)

    def jobs(self) -> list[str]:
        """Job ids slurmctld still lists (pending, running or recently ended)."""
        out = self.run("squeue", "-h", "-o", "%i")
        return out.stdout.split()

    def down(self) -> None:
        subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "down", "--dir", str(self.dir)], capture_output=True)


def slurm_unavailable() -> str | None:
    """Why the SLURM tests cannot run here (not root, packages absent), or None: the script's own answer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slurm_cluster", CLUSTER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.why_not()
