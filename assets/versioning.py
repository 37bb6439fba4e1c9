"""Data versions shared by Dagster and DVC: each asset's data version is the DVC hash of its output.

DVC 3 hashes a file as the md5 of its bytes and a folder as the md5 of the JSON list of its files
(`[{"md5": ..., "relpath": ...}]`, sorted by relpath, `json.dumps(..., sort_keys=True)`) plus `.dir`, leaving out
what `.dvcignore` names. `dvc_hash` computes the same value without DVC, so a materialisation outside a DVC
repository still carries the hash `dvc.lock` would record.

When the workspace is the DVC repository (its root holds `dvc.yaml` and `.dvc/`, and the params file is its
`params.yaml`), each materialisation also runs `dvc commit -f <stage>`: the stage's entry in `dvc.lock` then
records the deps, params and outputs the asset just produced (the same stage function `dvc repro` runs, on the
same params file), so `dvc status` finds nothing to do. The other direction, `dvc repro` -> Dagster, is
`lock_sync_events`: a runless materialisation per asset whose `dvc.lock` hash differs from its last data
version, with the stage's dep hashes as the input data versions, so Dagster sees those assets as up to date.

DVC commands are serialised: one file lock per repository for this project's processes, and DVC's own
`--wait-for-lock` for any other DVC process (a `dvc repro` in a terminal); a busy repository is waited for,
never a failure, up to `lock_timeout_s`.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import yaml
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)

from llava_core.config import PHASES, PipelineConfig

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


# --- assets <-> DVC stages ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DvcStage:
    name: str  # as in dvc.lock: "download@<source>", "hdf5_phase1", ...
    outs: tuple[Path, ...]  # the primary output (whose hash is the data version) first


def dvc_stages(cfg: PipelineConfig) -> dict[dg.AssetKey, DvcStage]:
    """Every asset that has a DVC stage in dvc.yaml, with the stage's outputs (published_model has none)."""
    reports = cfg.path("reports")
    out = {dg.AssetKey(f"raw_{s}"): DvcStage(f"download@{s}", (cfg.raw_dir(s),)) for s in cfg.sources}
    for d in cfg.datasets:
        jsonl = cfg.jsonl_path(d)
        out[dg.AssetKey(f"jsonl_{d}")] = DvcStage(f"convert@{d}", (jsonl, jsonl.with_suffix(".report.json")))
    for p in PHASES:
        out[dg.AssetKey(f"hdf5_{p}")] = DvcStage(f"hdf5_{p}", (cfg.hdf5_dir(p),))
        out[dg.AssetKey(f"checkpoint_{p}")] = DvcStage(f"train_{p}", (cfg.checkpoint_dir(p),))
    out[dg.AssetKey("hf_model")] = DvcStage("export_hf", (cfg.path("models") / "hf",))
    out[dg.AssetKey("llava_model")] = DvcStage("export_llava", (cfg.path("models") / "llava",))
    out[dg.AssetKey("eval_report")] = DvcStage("evaluate", (reports / "eval.json", reports / "answers.jsonl"))
    return out


def workspace_root(cfg: PipelineConfig) -> Path:
    root = Path(cfg.workspace.root)
    return (root if root.is_absolute() else cfg.base_dir / root).resolve()


# --- the DVC repository -------------------------------------------------------------------------------------
class DvcError(RuntimeError):
    """A DVC command failed, or Dagster and dvc.lock disagree on an output's hash."""


class DvcRepo:
    """A DVC repository whose commands run one at a time (file lock + DVC's `--wait-for-lock`)."""

    def __init__(self, root: Path, lock_timeout_s: float = 600.0):
        self.root = Path(root).resolve()
        self.lock_timeout_s = lock_timeout_s

    @classmethod
    def for_workspace(cls, cfg: PipelineConfig, params_path: str, lock_timeout_s: float = 600.0):
        """(repo, "") when the workspace is the DVC repository this params file drives, else (None, why not)."""
        root = workspace_root(cfg)
        if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
            return None, f"{root} is not a DVC repository (no dvc.yaml and .dvc/)"
        if Path(params_path).resolve() != root / "params.yaml":
            return None, f"the params file {params_path} is not the repository's params.yaml"
        for stage in dvc_stages(cfg).values():
            for p in stage.outs:
                if not p.resolve().is_relative_to(root):
                    return None, f"{p} lies outside the DVC repository {root}"
        return cls(root, lock_timeout_s), ""

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
                cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", *args]
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


def commit_gate(settings, stage_name: str) -> str:
    """Record a gate stage (`validate_<phase>`, no asset of its own: a Dagster asset check) in dvc.lock after
    it ran in Dagster, so `dvc status` agrees; returns what happened, for the check's metadata."""
    cfg = settings.load()
    repo, why_not = DvcRepo.for_workspace(cfg, settings.params_path, settings.dvc_lock_timeout_s)
    if repo is None or not settings.dvc_commit:
        return why_not or "dvc commit turned off (settings.dvc_commit)"
    repo.run("commit", "--force", "--quiet", stage_name)
    return f"committed ({repo.root / 'dvc.lock'})"


# --- what a materialisation records -------------------------------------------------------------------------
def record_version(result: dg.MaterializeResult, key: dg.AssetKey, settings) -> dg.MaterializeResult:
    """The asset's result plus its DVC hash as data version, output size and count, and its dvc.lock entry."""
    cfg = settings.load()
    stage = dvc_stages(cfg)[key]
    root = workspace_root(cfg)
    ignore = DvcIgnore(root)
    hashes = [dvc_hash(p, ignore) for p in stage.outs]
    primary = hashes[0]
    meta: dict = {
        "dvc_stage": stage.name,
        "dvc_md5": primary.md5,
        "output_path": dg.MetadataValue.path(str(stage.outs[0])),
        "output_bytes": primary.bytes,
        "output_files": primary.files,
    }
    for p, h in zip(stage.outs[1:], hashes[1:], strict=True):
        meta[f"dvc_md5/{p.name}"] = h.md5
    repo, why_not = DvcRepo.for_workspace(cfg, settings.params_path, settings.dvc_lock_timeout_s)
    if repo is None or not settings.dvc_commit:
        meta["dvc_lock"] = why_not or "dvc commit turned off (settings.dvc_commit)"
    else:
        repo.run("commit", "--force", "--quiet", stage.name)
        recorded = lock_hashes(repo.lock_stages().get(stage.name, {}), "outs")
        for p, h in zip(stage.outs, hashes, strict=True):
            if recorded.get(repo.rel(p)) != h.md5:
                raise DvcError(
                    f"{stage.name}: dvc.lock records {recorded.get(repo.rel(p))} for {repo.rel(p)}, "
                    f"the asset hashed {h.md5}: the output changed while it was being committed"
                )
        meta["dvc_lock"] = f"committed ({repo.root / 'dvc.lock'})"
        if settings.dvc_remote:
            repo.run("push", "--quiet", "--remote", settings.dvc_remote, stage.name)
            meta["dvc_remote"] = settings.dvc_remote
    return dg.MaterializeResult(
        asset_key=result.asset_key,
        metadata={**(result.metadata or {}), **meta},
        check_results=result.check_results,
        data_version=dg.DataVersion(primary.md5),
        tags=result.tags,
        value=result.value,
    )


def versioned(key: dg.AssetKey) -> Callable:
    """Decorator (under `@dg.asset`) for an asset function taking `settings: PipelineSettings` and returning a
    MaterializeResult: adds the data version and the DVC agreement of `record_version`."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            if not isinstance(result, dg.MaterializeResult):
                raise TypeError(
                    f"{key.to_user_string()}: a versioned asset returns a MaterializeResult, got {result!r}"
                )
            return record_version(result, key, kwargs["settings"])

        # annotations resolved in the asset module (Dagster reads them to find config and resources)
        wrapper.__signature__ = inspect.signature(fn, eval_str=True)
        return wrapper

    return decorate


# --- dvc repro -> Dagster -----------------------------------------------------------------------------------
@dataclass
class LockSync:
    events: list[dg.AssetMaterialization]
    unchanged: list[str]  # asset keys whose last data version already equals dvc.lock
    skipped: dict[str, str]  # asset key -> why no event: the stage or its output is not in dvc.lock
    differs: list[str]  # asset keys whose output in the workspace is not what dvc.lock records


def lock_sync_events(
    cfg: PipelineConfig, repo: DvcRepo, latest: Callable[[dg.AssetKey], str | None], parents: dict
) -> LockSync:
    """A materialisation for each asset whose dvc.lock hash differs from its latest data version (`latest`),
    when the workspace holds exactly what dvc.lock says; the stage's dep hashes become its input versions."""
    stages = dvc_stages(cfg)
    lock = repo.lock_stages()
    ignore = DvcIgnore(repo.root)
    sync = LockSync([], [], {}, [])
    for key, stage in stages.items():
        name = key.to_user_string()
        entry = lock.get(stage.name)
        if entry is None:
            sync.skipped[name] = f"no {stage.name} stage in dvc.lock"
            continue
        primary = repo.rel(stage.outs[0])
        md5 = lock_hashes(entry, "outs").get(primary)
        if md5 is None:
            sync.skipped[name] = f"dvc.lock's {stage.name} has no hash for {primary}"
            continue
        if latest(key) == md5:
            sync.unchanged.append(name)
            continue
        if not stage.outs[0].exists() or dvc_hash(stage.outs[0], ignore).md5 != md5:
            sync.differs.append(name)
            continue
        deps = lock_hashes(entry, "deps")
        tags = {
            DATA_VERSION_TAG: md5,
            DATA_VERSION_IS_USER_PROVIDED_TAG: "true",
            CODE_VERSION_TAG: f"dvc.lock:{stage.name}",
        }
        for parent in parents.get(key, ()):
            parent_stage = stages.get(parent)
            dep = deps.get(repo.rel(parent_stage.outs[0])) if parent_stage else None
            if dep is not None:
                tags[get_input_data_version_tag(parent)] = dep
                tags[get_input_event_pointer_tag(parent)] = "NULL"
        meta = {
            "dvc_stage": stage.name,
            "dvc_md5": md5,
            "output_path": dg.MetadataValue.path(str(stage.outs[0])),
            "source": "dvc.lock (dvc repro or dvc checkout)",
        }
        sync.events.append(dg.AssetMaterialization(asset_key=key, metadata=meta, tags=tags))
    return sync
