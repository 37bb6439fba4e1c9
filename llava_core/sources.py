"""Stage 1, download: bring a declared source into `data/raw/<source>/` with a manifest of what arrived.

Kinds: `generated` (the embedded synthetic shapes), `local` (a folder), `hf` (a Hugging Face Hub snapshot at a
pinned commit), `s3` (every object under a bucket prefix) and `http` (one URL, sha256-pinned, resumable).
With `extract: true`, archives (zip, tar, tar.gz) that arrive are extracted in place, safely, and removed.

Each source is written to a temporary sibling folder and renamed into place when complete, so a killed
download never leaves a folder that a later stage would take for a finished one. A second run with the
same source declaration and an intact folder transfers nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_core import synthetic
from llava_core.config import PipelineConfig, SourceConfig, partial_dir, replace_dir, staged, write_json_atomic
from llava_core.fetch import HEX64, check_hf_revision, extract_all, fetch_hf, fetch_http, fetch_s3, sha256_file

MANIFEST = "manifest.json"


@dataclass
class DownloadResult:
    source: str
    path: Path
    files: int
    bytes: int
    skipped: bool


def build_manifest(folder: Path, declaration: dict) -> dict:
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files.append({"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)})
    return {"declaration": declaration, "files": files}


def manifest_intact(folder: Path, declaration: dict) -> bool:
    """True when the folder holds a manifest for this declaration and every listed file has its size."""
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    if manifest.get("declaration") != declaration:
        return False
    return all(
        (folder / f["path"]).is_file() and (folder / f["path"]).stat().st_size == f["size"] for f in manifest["files"]
    )


def _fetch_generated(src: SourceConfig, dest: Path, work: Path) -> None:
    generators: dict[str, Callable[[Path, dict], object]] = {
        "synthetic_shapes": lambda d, o: synthetic.generate(d, synthetic.ShapesOptions(**o)),
    }
    if src.generator not in generators:
        raise ValueError(f"unknown generator {src.generator!r}; valid: {sorted(generators)}")
    generators[src.generator](dest, src.options)


def _fetch_local(src: SourceConfig, dest: Path, work: Path) -> None:
    if not src.location:
        raise ValueError("a local source needs 'location' (a folder)")
    origin = Path(src.location).expanduser()
    if not origin.is_dir():
        raise FileNotFoundError(f"local source folder not found: {origin}")
    # symlinks=True copies links as links; check_image later refuses any that leave the image root
    shutil.copytree(origin, dest, symlinks=True, dirs_exist_ok=True)


def _fetch_hf(src: SourceConfig, dest: Path, work: Path) -> None:
    fetch_hf(src.location, src.revision, src.patterns, src.options, dest, work)


def _fetch_s3(src: SourceConfig, dest: Path, work: Path) -> None:
    fetch_s3(src.location, src.patterns, src.options, dest)


def _fetch_http(src: SourceConfig, dest: Path, work: Path) -> None:
    fetch_http(src.location, src.sha256, src.options, dest, work)


# kind -> fetcher(src, temporary destination folder, work folder kept across interrupted runs)
SOURCE_KINDS: dict[str, Callable[[SourceConfig, Path, Path], None]] = {
    "generated": _fetch_generated,
    "local": _fetch_local,
    "hf": _fetch_hf,
    "s3": _fetch_s3,
    "http": _fetch_http,
}

# the options each kind reads (generated: the generator's own options, checked by the generator)
KIND_OPTIONS: dict[str, set[str] | None] = {
    "generated": None,
    "local": set(),
    "hf": {"repo_type"},
    "s3": {"endpoint_url", "region", "multipart_threshold", "multipart_chunksize", "max_concurrency", "max_attempts"},
    "http": {"filename", "retries", "timeout_s", "backoff_s"},
}


def validate_source(src: SourceConfig) -> None:
    """Per-kind checks of a declaration; raises ValueError naming the field and what is expected."""
    kind = src.kind
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {sorted(SOURCE_KINDS)}")
    valid = KIND_OPTIONS[kind]
    if valid is not None and set(src.options) - valid:
        raise ValueError(
            f"options: unknown key(s) {sorted(set(src.options) - valid)} for kind {kind!r}; valid: {sorted(valid)}"
        )
    if kind == "generated" and not src.generator:
        raise ValueError("a generated source needs 'generator'")
    if kind != "generated" and not src.location:
        raise ValueError(f"a {kind} source needs 'location'")
    if src.revision is not None and kind != "hf":
        raise ValueError(f"'revision' applies to hf sources only, not {kind!r}")
    if src.sha256 is not None and kind != "http":
        raise ValueError(f"'sha256' applies to http sources only, not {kind!r}")
    if src.patterns and kind not in ("hf", "s3"):
        raise ValueError(f"'patterns' applies to hf and s3 sources only, not {kind!r}")
    if not isinstance(src.patterns, list) or not all(isinstance(p, str) for p in src.patterns):
        raise ValueError("'patterns' must be a list of glob strings")
    if kind == "hf":
        check_hf_revision(src.location, src.revision)
    if kind == "s3" and not src.location.startswith("s3://"):
        raise ValueError(f"location {src.location!r}: an s3 source location must look like s3://bucket/prefix")
    if kind == "http":
        if not re.match(r"https?://", src.location):
            raise ValueError(f"location {src.location!r}: an http source needs an http:// or https:// URL")
        if not src.sha256 or not HEX64.fullmatch(src.sha256.lower()):
            raise ValueError("an http source needs 'sha256' (64 hex characters) to verify the download")


def declaration_of(src: SourceConfig) -> dict:
    """What the manifest records and a later run compares: the declaration, without defaults left unset."""
    decl = {"kind": src.kind, "generator": src.generator, "location": src.location, "options": src.options}
    extra = {"revision": src.revision, "sha256": src.sha256, "patterns": src.patterns, "extract": src.extract}
    decl.update({k: v for k, v in extra.items() if v})
    return decl


def download(cfg: PipelineConfig, source: str, refetch: bool = False) -> DownloadResult:
    """Fetch one source into `data/raw/<source>/` and write its manifest (files, sizes, sha256).

    An intact folder for the same declaration is kept as it is, unless `refetch` (the remote content
    changed under the same declaration, e.g. new objects under an S3 prefix)."""
    if source not in cfg.sources:
        raise KeyError(f"unknown source {source!r}; valid: {sorted(cfg.sources)}")
    src = cfg.sources[source]
    declaration = declaration_of(src)
    dest = cfg.raw_dir(source)
    if not refetch and manifest_intact(dest, declaration):
        manifest = json.loads((dest / MANIFEST).read_text())
        return DownloadResult(source, dest, len(manifest["files"]), sum(f["size"] for f in manifest["files"]), True)

    tmp = partial_dir(dest)
    work = dest.with_name(f".{dest.name}.work")  # kept when a transfer fails, so the next run resumes
    work.mkdir(parents=True, exist_ok=True)
    with staged(dest, tmp):  # a failed fetch leaves no partial folder (the work folder stays for a resume)
        SOURCE_KINDS[src.kind](src, tmp, work)
        if src.extract:
            extract_all(tmp)
        manifest = build_manifest(tmp, declaration)
        write_json_atomic(tmp / MANIFEST, manifest)
    replace_dir(tmp, dest)  # an outdated or damaged copy is replaced only once the new one is complete
    shutil.rmtree(work, ignore_errors=True)
    return DownloadResult(source, dest, len(manifest["files"]), sum(f["size"] for f in manifest["files"]), False)
