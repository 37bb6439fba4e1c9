"""`make demo` on a small workspace, for the tests that look at what it leaves in Dagster (the UI, the retrain).

The workspace is a git + DVC repository of the project with the small params; phase 2's instructions come from a
second source, a local folder outside the workspace (`shapes_local`), so that a change there concerns phase 2
only. The run is `python -m orchestration run` (what `make demo` runs) on the repository's own DAGSTER_HOME.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.conftest import GIT_IDENTITY, PROJECT, dvc_project, write_dvc_yaml

LOCAL_SOURCE = "shapes_local"


@dataclass
class Demo:
    repo: Path  # the workspace (git + DVC repository); its params.yaml
    home: Path  # DAGSTER_HOME
    local_source: Path  # the folder that source `shapes_local` copies
    env: dict
    report: dict | None = None  # what the run printed
    seconds: float | None = None

    @property
    def params(self) -> Path:
        return self.repo / "params.yaml"

    @classmethod
    def create(cls, root: Path) -> Demo:
        bindir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
        params_path = dvc_project(root / "repo", env)
        params = yaml.safe_load(params_path.read_text())
        local = root / "shapes_local"
        _generate(params["sources"]["synthetic_shapes"]["options"], local)
        params["sources"][LOCAL_SOURCE] = {"kind": "local", "location": str(local)}
        params["datasets"]["shapes_instruct"]["source"] = LOCAL_SOURCE
        for phase in ("phase1", "phase2"):
            params["train"][phase]["log_every"] = 1  # every step on the loss curve (the docs' pictures)
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        write_dvc_yaml(params_path, env)  # the new source's stage
        commit = ["git", "commit", "-q", "-am", "A second, local source for phase 2's instructions"]
        subprocess.run(commit, cwd=params_path.parent, env={**env, **GIT_IDENTITY}, check=True, capture_output=True)
        home = root / "dagster_home"
        home.mkdir()
        shutil.copy(PROJECT / "configs/dagster/dagster.yaml", home / "dagster.yaml")
        env.update({"DAGSTER_HOME": str(home), "LLAVA_PARAMS": str(params_path)})
        for name in ("LLAVA_ENV", "LLAVA_EXECUTOR"):
            env.pop(name, None)
        return cls(params_path.parent, home, local, env)

    def run(self) -> subprocess.CompletedProcess:
        """`python -m orchestration run`, as `make demo` (the default executor: a process per step)."""
        import json
        import time

        t0 = time.perf_counter()
        proc = subprocess.run(
            # from the checkout, as `make demo` (the repository holds a copy of llava_core, for DVC's deps)
            [sys.executable, "-m", "orchestration", "run"],
            cwd=PROJECT,
            env=self.env,
            capture_output=True,
            text=True,
        )
        self.seconds = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr[-5000:]
        self.report = json.loads(proc.stdout)
        return proc


def _generate(options: dict, folder: Path) -> None:
    """The synthetic source's files, generated into a plain folder (the local source's content)."""
    from llava_core.data import synthetic

    generator = synthetic.GENERATORS["synthetic_shapes"]
    generator.generate(folder, generator.options(**options))
