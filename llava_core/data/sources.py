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
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_core.artifacts import MANIFEST, file_manifest, tree_state
from llava_core.atomic import partial_dir, replace_dir, staged, write_json_atomic
from llava_core.config import SOURCE_KIND_OPTIONS, PipelineConfig, SourceConfig
from llava_core.data import synthetic
from llava_core.data.fetch import (
    extract_all,
    fetch_hf,
    fetch_http,
    fetch_s3,
    listing_digest,
    s3_client,
    s3_source_objects,
)
from llava_core.phases import choose


@dataclass
class DownloadResult:
    source: str
    path: Path
    files: int
    bytes: int
    skipped: bool


def build_manifest(folder: Path, declaration: dict) -> dict:
    return {"declaration": declaration, "files": file_manifest(folder)}


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
        (folder / f["path"]).is_file() and (folder / f["path"]).stat().st_size == f["bytes"] for f in manifest["files"]
    )


def _fetch_generated(src: SourceConfig, dest: Path, work: Path) -> None:
    generator = synthetic.GENERATORS[src.generator]  # the name was checked with the config
    generator.generate(dest, generator.options(**src.options))


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

assert set(SOURCE_KINDS) == set(SOURCE_KIND_OPTIONS), "every source kind of the schema has a fetcher"


def declaration_of(src: SourceConfig) -> dict:
    """What the manifest records and a later run compares: the declaration, without defaults left unset."""
    decl = {"kind": src.kind, "generator": src.generator, "location": src.location, "options": src.options}
    extra = {"revision": src.revision, "sha256": src.sha256, "patterns": src.patterns, "extract": src.extract}
    decl.update({k: v for k, v in extra.items() if v})
    return decl


def source_state(cfg: PipelineConfig, source: str, client=None, remote: bool = True) -> str | None:
    """What a source holds now, beyond its declaration: a digest of a local folder's files (paths, sizes, times) or
    of an S3 prefix's listing (keys, sizes, ETags, times; with `client`, else one from the source's options; only
    when `remote`). None for the kinds that the declaration pins: a generator's options, a Hub revision, a sha256."""
    src = cfg.sources[source]
    if src.kind == "local" and src.location:
        return tree_state(Path(src.location).expanduser())
    if src.kind == "s3" and remote:
        return listing_digest(s3_source_objects(client or s3_client(src.options), src.location, src.patterns))
    return None


def download(cfg: PipelineConfig, source: str, refetch: bool = False) -> DownloadResult:
    """Fetch one source into `data/raw/<source>/` and write its manifest (files, sizes, sha256).

    An intact folder for the same declaration is kept as it is, unless `refetch` (the remote content
    changed under the same declaration, e.g. new objects under an S3 prefix)."""
    choose("source", source, cfg.sources)
    src = cfg.sources[source]
    declaration = declaration_of(src)
    dest = cfg.raw_dir(source)
    if not refetch and manifest_intact(dest, declaration):
        manifest = json.loads((dest / MANIFEST).read_text())
        return DownloadResult(source, dest, len(manifest["files"]), sum(f["bytes"] for f in manifest["files"]), True)

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
    return DownloadResult(source, dest, len(manifest["files"]), sum(f["bytes"] for f in manifest["files"]), False)
