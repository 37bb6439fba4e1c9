"""DVC without Dagster: DVC's own hashes of the outputs, the repository's dvc.lock, and `dvc commit` / `push`.

DVC 3 hashes a file as the md5 of its bytes and a folder as the md5 of the JSON list of its files
(`[{"md5": ..., "relpath": ...}]`, sorted by relpath, `json.dumps(..., sort_keys=True)`) plus `.dir`, leaving out
what `.dvcignore` names. `dvc_hash` computes the same value without DVC, so a materialisation outside a DVC
repository still carries the hash `dvc.lock` would record.

DVC commands are serialised: one file lock per repository for this project's processes, and DVC's own
`--wait-for-lock` for any other DVC process (a `dvc repro` in a terminal); a busy repository is waited for,
never a failure, up to `lock_timeout_s`. Which stage writes which output comes from the stage table
(`llava_core.pipeline`), the same one `dvc.yaml` is checked against.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from llava_core.config import PipelineConfig
from llava_core.pipeline import steps
from llava_core.recording import dvc_executable as find_dvc
from llava_core.recording import dvc_workspace

CHUNK = 1 << 20
LOCK_NAME = "llava-dvc.lock"  # under .dvc/tmp/, beside DVC's own lock


# --- DVC's hashes -------------------------------------------------------------------------------------------
class DvcIgnore:
    """The patterns of a repository root's `.dvcignore` (gitignore syntax), matched on paths from that root."""

    def __init__(self, root: Path):
        import pathspec

        self.root = root.resolve()
        path = self.root / ".dvcignore"
        lines = path.read_text().splitlines() if path.is_file() else []
        self.spec = pathspec.GitIgnoreSpec.from_lines(lines)

    def ignored(self, path: Path) -> bool:
        try:
            rel = path.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return False  # outside the repository: no pattern applies
        return self.spec.match_file(rel) or self.spec.match_file(rel + "/")


@dataclass(frozen=True)
class OutHash:
    md5: str  # as dvc.lock writes it: "<md5>" for a file, "<md5>.dir" for a folder
    files: int
    bytes: int


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def dvc_hash(path: Path, ignore: DvcIgnore | None = None) -> OutHash:
    """The hash DVC records for `path` (file or folder); raises FileNotFoundError when it is missing."""
    path = Path(path)
    if path.is_file():
        return OutHash(file_md5(path), 1, path.stat().st_size)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: the output to version does not exist")
    entries, size = [], 0
    for dirpath, dirnames, filenames in os.walk(path):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not (ignore and ignore.ignored(here / d))]
        for name in filenames:
            f = here / name
            if ignore and ignore.ignored(f):
                continue
            entries.append({"md5": file_md5(f), "relpath": f.relative_to(path).as_posix()})
            size += f.stat().st_size
    entries.sort(key=lambda e: e["relpath"])
    digest = hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest()
    return OutHash(digest + ".dir", len(entries), size)


@dataclass(frozen=True)
class DvcStage:
    name: str  # as in dvc.lock: "download_<source>", "hdf5_phase1", ...
    outs: tuple[Path, ...]  # the primary output (whose hash is the data version) first


def dvc_stages(cfg: PipelineConfig) -> dict[str, DvcStage]:
    """Every stage of the table that has an asset, by asset name, with its DVC stage and outputs."""
    return {
        s.asset_name(k): DvcStage(s.dvc_name(k), tuple(s.outs(cfg, k))) for s, k in steps(cfg) if s.asset is not None
    }


# --- the DVC repository -------------------------------------------------------------------------------------
class DvcError(RuntimeError):
    """A DVC command failed, or Dagster and dvc.lock disagree on an output's hash."""


def dvc_executable() -> str:
    """The `dvc` command of the DVC tool environment (`llava_core.recording.dvc_executable`); DvcError if none."""
    found = find_dvc()
    if not found:
        raise DvcError(f"no `dvc` command beside {sys.executable} nor on PATH: run `make setup` (docs/install.md)")
    return found


class DvcRepo:
    """A DVC repository whose commands run one at a time (file lock + DVC's `--wait-for-lock`)."""

    def __init__(self, root: Path, lock_timeout_s: float = 600.0):
        self.root = Path(root).resolve()
        self.lock_timeout_s = lock_timeout_s

    @classmethod
    def for_workspace(cls, cfg: PipelineConfig, params_path: str, lock_timeout_s: float = 600.0):
        """(repo, "") when the workspace is the DVC repository this params file drives, else (None, why not)."""
        root, why_not = dvc_workspace(cfg, params_path)
        return (None, why_not) if root is None else (cls(root, lock_timeout_s), "")

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    @functools.cached_property
    def _lock_path(self) -> Path:
        tmp = self.root / ".dvc" / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / LOCK_NAME

    def run(self, *args: str, timeout_s: float | None = None) -> str:
        """`dvc <args>` in the repository, after the other DVC commands of this project; returns stdout.

        Waits up to `lock_timeout_s` for this project's lock; `timeout_s` bounds the command itself (None: a
        push of a large output may take hours)."""
        deadline = time.monotonic() + self.lock_timeout_s
        with open(self._lock_path, "a+") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise DvcError(
                            f"dvc {' '.join(args)}: {self._lock_path} still held after {self.lock_timeout_s:g} s"
                        ) from None
                    time.sleep(0.2)
            try:
                cmd = [dvc_executable(), "--wait-for-lock", *args]
                try:
                    proc = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    raise DvcError(f"dvc {' '.join(args)}: no answer within {timeout_s:g} s") from None
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        if proc.returncode != 0:
            raise DvcError(
                f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        return proc.stdout

    def lock_stages(self) -> dict[str, dict]:
        """dvc.lock's stages ({} when there is no lock yet)."""
        path = self.root / "dvc.lock"
        if not path.is_file():
            return {}
        return (yaml.safe_load(path.read_text()) or {}).get("stages", {})


def lock_hashes(entry: dict, field: str) -> dict[str, str]:
    """{path: md5} of a dvc.lock stage entry's `deps` or `outs`."""
    return {item["path"]: item["md5"] for item in entry.get(field, []) if "md5" in item}


def commit(repo: DvcRepo, stage: DvcStage, hashes: list[OutHash]) -> None:
    """`dvc commit --force <stage>`, then check that dvc.lock records the hashes the caller computed."""
    repo.run("commit", "--force", "--quiet", stage.name)
    recorded = lock_hashes(repo.lock_stages().get(stage.name, {}), "outs")
    for p, h in zip(stage.outs, hashes, strict=True):
        if recorded.get(repo.rel(p)) != h.md5:
            raise DvcError(
                f"{stage.name}: dvc.lock records {recorded.get(repo.rel(p))} for {repo.rel(p)}, "
                f"the asset hashed {h.md5}: the output changed while it was being committed"
            )
