"""The small workspace as two temporary git + DVC repositories at different paths, shared by the DVC tests:
`recorded` (`llava-pipeline all`, each stage recorded in dvc.lock) and `reproduced` (`dvc repro`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import dvc_project, project_env

# phase 1 also reports to MLflow (a file store) and W&B (offline): what `train.<phase>.trackers` adds
ALL_TRACKERS = ["dvclive", "tensorboard", "mlflow", "wandb"]


def run(cmd: list[str], cwd, env) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def changed_stages(status: str) -> set[str]:
    """The stage names `dvc status` lists (lines `<stage>:` at the start)."""
    return {line[:-1] for line in status.splitlines() if line.endswith(":") and not line.startswith((" ", "\t"))}


def small_repo(repo: Path, env: dict) -> Path:
    """The small workspace with phase 2's images in a source of their own (`shapes_b`), every tracker on phase 1,
    a metrics record per step (curves of a few points)."""
    params = dvc_project(repo, env, shapes_b="shapes_instruct")
    p = yaml.safe_load(params.read_text())
    p["train"]["phase1"]["trackers"] = ALL_TRACKERS
    for phase in ("phase1", "phase2"):
        p["train"][phase]["log_every"] = 1
    params.write_text(yaml.safe_dump(p, sort_keys=False))
    assert run(["llava-pipeline", "dvc-yaml"], repo, env) == (repo / "dvc.yaml").read_text()  # no stage changed
    run(["git", "commit", "-q", "-am", "Every tracker on phase 1"], repo, env)
    return params


def tracker_env(env: dict, folder: Path) -> dict:
    return {
        **env,
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",  # MLflow 3 refuses new file stores
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(folder),
        "WANDB_SILENT": "true",
    }


@pytest.fixture(scope="session")
def recorded(tmp_path_factory):
    """`llava-pipeline all` in a DVC repository: (repo, env)."""
    base = tmp_path_factory.mktemp("recorded")
    env = tracker_env(project_env(), base)
    repo = base / "repo"
    small_repo(repo, env)
    run(["llava-pipeline", "all"], repo, env)
    return repo, env


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory):
    """`dvc repro` in another copy, at another path: (repo, env)."""
    base = tmp_path_factory.mktemp("reproduced")
    env = tracker_env(project_env(), base)
    repo = base / "elsewhere" / "copy"
    small_repo(repo, env)
    run(["dvc", "repro"], repo, env)
    return repo, env
