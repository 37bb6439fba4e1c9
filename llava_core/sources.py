"""Stage 1, download: bring a declared source into `data/raw/<source>/` with a manifest of what arrived.

Each source is written to a temporary sibling folder and renamed into place when complete, so a killed
download never leaves a folder that a later stage would take for a finished one. A second run with the
same source declaration and an intact folder transfers nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_core import synthetic
from llava_core.config import PipelineConfig, SourceConfig, write_json_atomic

MANIFEST = "manifest.json"


@dataclass
class DownloadResult:
    source: str
    path: Path
    files: int
    bytes: int
    skipped: bool


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def _fetch_generated(src: SourceConfig, dest: Path) -> None:
    generators: dict[str, Callable[[Path, dict], object]] = {
        "synthetic_shapes": lambda d, o: synthetic.generate(d, synthetic.ShapesOptions(**o)),
    }
    if src.generator not in generators:
        raise ValueError(f"unknown generator {src.generator!r}; valid: {sorted(generators)}")
    generators[src.generator](dest, src.options)


def _fetch_local(src: SourceConfig, dest: Path) -> None:
    if not src.location:
        raise ValueError("a local source needs 'location' (a folder)")
    origin = Path(src.location).expanduser()
    if not origin.is_dir():
        raise FileNotFoundError(f"local source folder not found: {origin}")
    # symlinks=True copies links as links; check_image later refuses any that leave the image root
    shutil.copytree(origin, dest, symlinks=True, dirs_exist_ok=True)


SOURCE_KINDS: dict[str, Callable[[SourceConfig, Path], None]] = {
    "generated": _fetch_generated,
    "local": _fetch_local,
}


def download(cfg: PipelineConfig, source: str) -> DownloadResult:
    """Fetch one source into `data/raw/<source>/` and write its manifest (files, sizes, sha256)."""
    if source not in cfg.sources:
        raise KeyError(f"unknown source {source!r}; valid: {sorted(cfg.sources)}")
    src = cfg.sources[source]
    declaration = {"kind": src.kind, "generator": src.generator, "location": src.location, "options": src.options}
    dest = cfg.raw_dir(source)
    if manifest_intact(dest, declaration):
        manifest = json.loads((dest / MANIFEST).read_text())
        return DownloadResult(source, dest, len(manifest["files"]), sum(f["size"] for f in manifest["files"]), True)

    tmp = dest.with_name(f".{dest.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    SOURCE_KINDS[src.kind](src, tmp)
    manifest = build_manifest(tmp, declaration)
    write_json_atomic(tmp / MANIFEST, manifest)
    if dest.exists():  # an outdated or damaged copy: replaced only once the new one is complete
        old = dest.with_name(f".{dest.name}.old")
        if old.exists():
            shutil.rmtree(old)
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)
    return DownloadResult(source, dest, len(manifest["files"]), sum(f["size"] for f in manifest["files"]), False)
