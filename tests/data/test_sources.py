"""Download stage: manifest, skip when intact, re-fetch when the declaration changes, partial folders."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from llava_core.artifacts import MANIFEST
from llava_core.data.sources import download
from llava_core.params import load_config
from tests.helpers_unit import base_params, write_params, write_png

SMALL = {"num_pretrain": 4, "num_instruct": 4, "num_eval_images": 1, "image_size": 16}


def gen_cfg(tmp_path: Path, **options):
    params = base_params(tmp_path / "ws", **{**SMALL, **options})
    return load_config(write_params(tmp_path, params))


def local_cfg(tmp_path: Path, origin: Path):
    params = base_params(tmp_path / "ws", **SMALL)
    params["sources"]["mine"] = {"kind": "local", "location": str(origin)}
    return load_config(write_params(tmp_path, params))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (mtime_ns, inode) of every file."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_generated_download_writes_matching_manifest(tmp_path):
    cfg = gen_cfg(tmp_path)
    res = download(cfg, "synthetic_shapes")
    dest = cfg.raw_dir("synthetic_shapes")
    assert res.path == dest and res.source == "synthetic_shapes" and res.skipped is False
    manifest = json.loads((dest / MANIFEST).read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(listed) == on_disk
    assert {"pretrain.json", "instruct.json", "eval_questions.jsonl"} <= on_disk
    assert "images/pt_000000.png" in on_disk and "eval_images/ev_000000.png" in on_disk
    for rel, f in listed.items():
        assert f["sha256"] == sha(dest / rel)
        assert f["bytes"] == (dest / rel).stat().st_size
    assert res.files == len(listed)
    assert res.bytes == sum(f["bytes"] for f in listed.values())
    assert manifest["declaration"] == {
        "kind": "generated",
        "generator": "synthetic_shapes",
        "location": None,
        "options": {"seed": 0, **SMALL},
    }
    assert len(json.loads((dest / "pretrain.json").read_text())) == 4
    # nothing temporary left next to the result
    assert sorted(p.name for p in dest.parent.iterdir()) == ["synthetic_shapes"]


def test_second_download_is_skipped_and_rewrites_nothing(tmp_path):
    cfg = gen_cfg(tmp_path)
    first = download(cfg, "synthetic_shapes")
    dest = cfg.raw_dir("synthetic_shapes")
    before = files_under(dest)
    second = download(cfg, "synthetic_shapes")
    assert second.skipped is True
    assert (second.files, second.bytes, second.path) == (first.files, first.bytes, first.path)
    assert files_under(dest) == before
    # a fresh load of the same params file (same declaration) also skips
    assert download(load_config(tmp_path / "params.yaml"), "synthetic_shapes").skipped is True


def test_changed_options_trigger_fresh_download(tmp_path):
    cfg = gen_cfg(tmp_path)
    download(cfg, "synthetic_shapes")
    dest = cfg.raw_dir("synthetic_shapes")
    old_pretrain = (dest / "pretrain.json").read_text()
    cfg2 = gen_cfg(tmp_path, num_pretrain=6, seed=1)
    res = download(cfg2, "synthetic_shapes")
    assert res.skipped is False
    assert len(json.loads((dest / "pretrain.json").read_text())) == 6
    assert (dest / "pretrain.json").read_text() != old_pretrain
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["declaration"]["options"]["num_pretrain"] == 6
    assert manifest["declaration"]["options"]["seed"] == 1
    for f in manifest["files"]:
        assert f["sha256"] == sha(dest / f["path"])
    # the old copy is gone, nothing temporary remains
    assert sorted(p.name for p in dest.parent.iterdir()) == ["synthetic_shapes"]
    assert download(cfg2, "synthetic_shapes").skipped is True


def test_damaged_folder_is_fetched_again(tmp_path):
    cfg = gen_cfg(tmp_path)
    download(cfg, "synthetic_shapes")
    dest = cfg.raw_dir("synthetic_shapes")
    (dest / "images" / "pt_000001.png").unlink()
    res = download(cfg, "synthetic_shapes")
    assert res.skipped is False
    assert (dest / "images" / "pt_000001.png").is_file()
    (dest / "pretrain.json").write_text("[]")  # a size change also counts as damage
    assert download(cfg, "synthetic_shapes").skipped is False
    assert len(json.loads((dest / "pretrain.json").read_text())) == 4


def test_local_source_copies_folder(tmp_path):
    origin = tmp_path / "origin"
    write_png(origin / "imgs" / "a.png")
    write_png(origin / "imgs" / "sub" / "b.png", color=(1, 2, 3))
    (origin / "data.json").write_text('[{"id": 1}]')
    cfg = local_cfg(tmp_path, origin)
    res = download(cfg, "mine")
    dest = cfg.raw_dir("mine")
    assert res.skipped is False and res.files == 3
    for rel in ("imgs/a.png", "imgs/sub/b.png", "data.json"):
        assert (dest / rel).read_bytes() == (origin / rel).read_bytes()
    manifest = json.loads((dest / MANIFEST).read_text())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        rel: sha(origin / rel) for rel in ("data.json", "imgs/a.png", "imgs/sub/b.png")
    }
    assert manifest["declaration"]["location"] == str(origin)
    # the origin is untouched (a copy, not a move)
    assert (origin / "imgs" / "a.png").is_file() and not (origin / MANIFEST).exists()
    assert download(cfg, "mine").skipped is True


def test_local_source_missing_folder(tmp_path):
    cfg = local_cfg(tmp_path, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="local source folder not found"):
        download(cfg, "mine")
    assert not cfg.raw_dir("mine").exists()


def test_unknown_source(tmp_path):
    cfg = gen_cfg(tmp_path)
    with pytest.raises(KeyError, match="unknown source 'coco'"):
        download(cfg, "coco")


def test_leftover_partial_folder_is_cleaned(tmp_path):
    cfg = gen_cfg(tmp_path)
    dest = cfg.raw_dir("synthetic_shapes")
    partial = dest.with_name(".synthetic_shapes.partial")
    (partial / "images").mkdir(parents=True)
    (partial / "images" / "junk.png").write_bytes(b"half a file")
    (partial / "pretrain.json").write_text("[")
    res = download(cfg, "synthetic_shapes")
    assert res.skipped is False
    assert res.path == dest and res.path.name == "synthetic_shapes"
    assert not partial.exists()
    assert not (dest / "images" / "junk.png").exists()
    assert len(json.loads((dest / "pretrain.json").read_text())) == 4
    manifest = json.loads((dest / MANIFEST).read_text())
    assert "images/junk.png" not in {f["path"] for f in manifest["files"]}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["synthetic_shapes"]


def test_partial_folder_alone_is_not_taken_for_a_download(tmp_path):
    # a killed run that had already written everything, manifest included, into the .partial folder:
    # the next run must not use it as the result, it starts again
    cfg = gen_cfg(tmp_path)
    download(cfg, "synthetic_shapes")
    dest = cfg.raw_dir("synthetic_shapes")
    partial = dest.with_name(".synthetic_shapes.partial")
    dest.rename(partial)
    marker = partial / "marker.txt"
    marker.write_text("from the killed run")
    os.utime(partial / "pretrain.json", ns=(1, 1))
    res = download(cfg, "synthetic_shapes")
    assert res.skipped is False
    assert not partial.exists()
    assert not (dest / "marker.txt").exists()
    assert (dest / "pretrain.json").stat().st_mtime_ns != 1
