"""A stage run outside DVC, recorded in the workspace's dvc.lock: `dvc commit --force <stage>`, a subprocess.

`llava-pipeline all` runs the same stage functions `dvc repro` runs, on the same params file, so recording each
stage's deps, params and outputs in dvc.lock after it ran is exact, and `dvc status` then has nothing to do (the
Dagster assets do the same through `orchestration.dvc`, which adds a lock across parallel steps and checks the
recorded hash against the asset's data version). This module starts the `dvc` command and imports no DVC: the
library stays free of it, and DVC runs from its own tool environment (docs/install.md).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from llava_core.config import PipelineConfig
from llava_core.pipeline import steps


def dvc_executable() -> str | None:
    """The `dvc` command beside this interpreter, else the first on PATH, else None.

    `make setup` puts in the virtualenv's bin a `dvc` that runs DVC from its own tool environment (DVC's hydra needs
    antlr4 4.9, Dagster 4.13: docs/install.md), so never `python -m dvc` from this environment."""
    beside = Path(sys.executable).parent / "dvc"  # not resolved: the virtualenv's bin, not the base interpreter's
    return str(beside) if beside.is_file() else shutil.which("dvc")


def dvc_workspace(cfg: PipelineConfig, params_path: str | Path) -> tuple[Path | None, str]:
    """(root, "") when the workspace is the DVC repository this params file drives, else (None, why not)."""
    root = cfg.root.resolve()
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return None, f"{root} is not a DVC repository (no dvc.yaml and .dvc/)"
    if Path(params_path).resolve() != root / "params.yaml":
        return None, f"the params file {params_path} is not the repository's params.yaml"
    for s, k in steps(cfg):
        for p in s.outs(cfg, k):
            if not p.resolve().is_relative_to(root):
                return None, f"{p} lies outside the DVC repository {root}"
    return root, ""


class RecordError(RuntimeError):
    """`dvc commit` of a stage that ran failed."""


def record_stage(root: Path, name: str, timeout_s: float | None = 600.0) -> None:
    """`dvc commit --force <name>` in the repository (waiting for a DVC command already running there)."""
    dvc = dvc_executable()
    if dvc is None:
        raise RecordError(f"no `dvc` command beside {sys.executable} nor on PATH: run `make setup` (docs/install.md)")
    cmd = [dvc, "--wait-for-lock", "commit", "--force", "--quiet", name]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RecordError(f"dvc commit {name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
