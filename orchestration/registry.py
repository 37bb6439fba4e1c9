"""The model registry without Dagster: an evaluated model becomes a GTO version of its dvc.yaml artifact.

DVC declares the exported models as `artifacts:` (generated dvc.yaml, type model); GTO records versions and
stages as git tags on the commit whose dvc.lock holds the model (`llava-hf@v0.1.0`, `llava-hf#prod#1`), and
`dvc artifacts get <repo> llava-hf --rev v0.1.0` (or `--stage prod`) downloads that model from the DVC remote.
`register` does what a person would: check the evaluation, check that dvc.lock records the model in the
workspace, commit dvc.lock with the results kept in git, `gto register --bump-<part>`, `gto assign --stage`,
and with `push`, `dvc push` the model and push the commit and tags. Commands run as subprocesses (`dvc` and `gto`
of the DVC tool environment, docs/install.md).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from llava_core.config import PipelineConfig
from llava_core.dvc_yaml import MODEL_ARTIFACTS
from llava_core.pipeline import stage, steps
from orchestration.dvc import DvcError, DvcRepo

EVAL_STAGE = "evaluate"


class RegistryError(RuntimeError):
    """Registration cannot go ahead: the workspace is not a committed DVC repository, or a command failed."""


@dataclass
class Registration:
    artifact: str
    registered: bool
    reason: str  # why not, or what was done
    version: str | None = None
    stage: str | None = None
    commit: str | None = None
    accuracy: float | None = None
    tags: tuple[str, ...] = ()


def tool(name: str) -> str:
    """`gto` (or `git`) beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise RegistryError(f"no `{name}` command beside {sys.executable} nor on PATH: run `make setup`")
    return found


def run(root: Path, *cmd: str) -> str:
    proc = subprocess.run([tool(cmd[0]), *cmd[1:]], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RegistryError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def export_stage(artifact: str) -> str:
    """The stage that writes an artifact's folder (MODEL_ARTIFACTS: stage -> name)."""
    return next(s for s, (name, _desc, _label) in MODEL_ARTIFACTS.items() if name == artifact)


def recorded_files(cfg: PipelineConfig, root: Path) -> list[str]:
    """What the registering commit holds: dvc.yaml, dvc.lock, params.yaml and every output kept in git."""
    kept = [p for s, k in steps(cfg) for p in s.in_git(cfg, k)]
    return ["dvc.yaml", "dvc.lock", "params.yaml", *(p.resolve().relative_to(root).as_posix() for p in kept)]


def check_recorded(repo: DvcRepo, names: list[str]) -> None:
    """dvc.lock must record the workspace's model and report (`dvc status` of their stages says nothing)."""
    out = repo.run("status", *names)
    if "up to date" not in out:
        raise RegistryError(f"dvc.lock does not record the workspace's {', '.join(names)}:\n{out}")


def commit(root: Path, files: list[str], message: str) -> str:
    """Commit `files` (and nothing else the user staged) when they changed; returns HEAD's sha."""
    present = [f for f in files if (root / f).exists()]
    run(root, "git", "add", "--", *present)
    if run(root, "git", "status", "--porcelain", "--", *present).strip():
        run(root, "git", "commit", "-q", "-m", message, "--", *present)
    return run(root, "git", "rev-parse", "HEAD").strip()


FIRST_VERSION = {"major": "v1.0.0", "minor": "v0.1.0", "patch": "v0.0.1"}  # the bump applied to v0.0.0


def version_args(root: Path, artifact: str, bump: str) -> list[str]:
    """`--bump-<part>` over the artifact's latest version; its first version is that bump of v0.0.0 (GTO cannot
    bump what has no version yet)."""
    latest = (json.loads(run(root, "gto", "show", "--json")).get(artifact) or {}).get("version")
    return [f"--bump-{bump}"] if latest else ["--version", FIRST_VERSION[bump]]


def created_tag(output: str) -> str:
    found = re.search(r"Created git tag '([^']+)'", output)
    if not found:
        raise RegistryError(f"gto did not report the tag it created:\n{output}")
    return found.group(1)


def register(cfg: PipelineConfig, params_path: str, lock_timeout_s: float = 600.0) -> Registration:
    """Register the evaluated model as the next version of `registry.artifact` (see the module docstring)."""
    rc = cfg.registry
    if rc is None:
        raise RegistryError("no `registry` section in the params file")
    report_path = cfg.report_file()
    if not report_path.is_file():
        raise RegistryError(f"{report_path} not found: evaluate the model first")
    accuracy = json.loads(report_path.read_text())["overall_accuracy"]
    if rc.min_accuracy is not None and accuracy < rc.min_accuracy:
        why = f"overall_accuracy {accuracy:.4f} is below registry.min_accuracy {rc.min_accuracy}"
        return Registration(rc.artifact, False, why, accuracy=accuracy)
    repo, why_not = DvcRepo.for_workspace(cfg, params_path, lock_timeout_s)
    if repo is None:
        raise RegistryError(f"cannot register: {why_not}")
    exporter = export_stage(rc.artifact)
    try:
        check_recorded(repo, [exporter, stage(EVAL_STAGE).dvc_name(None)])
    except DvcError as e:
        raise RegistryError(str(e)) from None
    message = f"Register {rc.artifact}: overall_accuracy {accuracy:.4f} ({cfg.preset} preset)"
    sha = commit(repo.root, recorded_files(cfg, repo.root), message)
    out = run(
        repo.root, "gto", "register", rc.artifact, sha, *version_args(repo.root, rc.artifact, rc.bump), "-m", message
    )
    tags = [created_tag(out)]
    version = tags[0].split("@", 1)[1]
    if rc.stage:
        out = run(repo.root, "gto", "assign", rc.artifact, "--version", version, "--stage", rc.stage, "-m", message)
        tags.append(created_tag(out))
    if rc.push:
        repo.run("push", exporter)
        run(repo.root, "git", "push", "-q", "origin", "HEAD", *(f"refs/tags/{t}" for t in tags))
    what = f"registered {rc.artifact} {version}" + (f" in stage {rc.stage}" if rc.stage else "")
    return Registration(rc.artifact, True, what, version, rc.stage, sha, accuracy, tuple(tags))
