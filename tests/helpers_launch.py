"""Shared by the launch tests: one workspace of built HDF5 data for both phases, params files that train from it
into their own checkpoint folders, and the one-machine SLURM cluster (scripts/slurm_cluster.py) on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
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


def interruptible() -> None:
    """In a child before it starts: Ctrl-C (SIGINT) back to its default. A test suite started in the background
    (`make test &`, a CI runner) ignores SIGINT, its children inherit that, and Python then keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(params: Path, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """`llava-pipeline --params <params> <args>` started in the background (Ctrl-C interrupts it)."""
    exe = str(Path(sys.executable).parent / "llava-pipeline")
    return subprocess.Popen(
        [exe, "--params", str(params), *args], env=env or os.environ.copy(), text=True, preexec_fn=interruptible, **kw
    )


def training_processes(spec: Path) -> list[psutil.Process]:
    """The training processes (`python -m llava_core.training.recipe`) started for a launch spec, not their launcher."""
    spec, found = Path(spec).resolve(), []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "llava_core.training.recipe" not in cmd or "accelerate.commands.launch" in cmd or "--config-json" not in cmd:
            continue
        if Path(cmd[cmd.index("--config-json") + 1]).resolve() == spec:
            found.append(proc)
    return found


SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def _signalled(proc: psutil.Process) -> bool:
    """Gone, running again (continued), or stopped with SIGTERM pending."""
    try:
        if proc.status() != psutil.STATUS_STOPPED:
            return True
        status = Path(f"/proc/{proc.pid}/status").read_text()
    except (psutil.NoSuchProcess, FileNotFoundError):
        return True
    masks = (int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:")))
    return any(mask & SIGTERM_BIT for mask in masks)


@contextmanager
def held_between_steps(spec: Path, timeout: float = 120) -> Iterator[None]:
    """Stop (SIGSTOP) a launch's training processes while the block has SLURM signal them, so that the signal lands
    mid-training whatever the machine's load (a tiny phase may otherwise finish before a preemption reaches it).
    On leaving, wait until each has SIGTERM pending or was continued (SLURM sends SIGCONT before a kill's SIGTERM),
    then continue them: they read the SIGTERM at their next step."""
    procs = wait_for("training processes", lambda: training_processes(spec), timeout)
    for proc in procs:
        proc.suspend()
    try:
        yield
        for proc in procs:
            wait_for(f"SIGTERM for training process {proc.pid}", lambda p=proc: _signalled(p), timeout)
    finally:
        for proc in procs:
            try:
                proc.resume()
            except psutil.NoSuchProcess:
                pass


def wait_for(what: str, check: Callable, timeout: float = 600, proc: subprocess.Popen | None = None):
    """Poll `check` until it returns something true (returned); fail on the timeout or when `proc` ends first."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert proc is None or proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)
    return found


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
