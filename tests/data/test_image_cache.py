"""The image checks' cache: verdicts by content digest and checker settings, shared by processes; a second HDF5
run over unchanged images decodes none of them."""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil

import pytest
from PIL import Image

from llava_core.data import image_cache
from llava_core.data.hdf5_writer import build_hdf5
from llava_core.data.image_cache import DB_NAME, ImageCheckCache, cache_folder
from llava_core.data.images import ANIMATED, FORMAT_MISMATCH, ImageChecker, ImageRejected
from tests.helpers_hdf5 import read_phase, small_workspace
from tests.helpers_unit import write_png, write_truncated_png


def images(root):
    """Good, small, truncated, garbage, a GIF named .jpg, a missing path and a path leaving the root."""
    write_png(root / "a" / "good.png", size=(40, 30))
    write_png(root / "a" / "small.png", size=(4, 30))
    write_truncated_png(root / "a" / "cut.png")
    (root / "a" / "junk.png").write_bytes(b"not an image")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(root / "a" / "anim.jpg", format="GIF", save_all=True, append_images=frames[1:])
    return ["a/good.png", "a/small.png", "a/cut.png", "a/junk.png", "a/anim.jpg", "a/none.png", "../out.png"]


def verdicts(results) -> list:
    return [(r.reason, str(r)) if isinstance(r, ImageRejected) else (r.format, r.size, r.notes) for r in results]


def test_second_check_decodes_nothing_and_gives_the_same_verdicts(tmp_path):
    rels = images(tmp_path)
    plain = ImageChecker(tmp_path, min_size=8).check_many(rels)  # no cache: the reference
    first = ImageChecker(tmp_path, min_size=8, cache=ImageCheckCache(cache_folder(tmp_path)))
    assert verdicts(first.check_many(rels)) == verdicts(plain)
    assert first.decoded == 5  # the five files that exist; a missing or escaping path is never decoded
    second = ImageChecker(tmp_path, min_size=8, cache=ImageCheckCache(cache_folder(tmp_path)))
    again = second.check_many(rels)
    assert second.decoded == 0 and second.cache.hits == 5
    assert verdicts(again) == verdicts(plain)
    assert [r.reason for r in again if isinstance(r, ImageRejected)] == [
        "image_too_small", "image_undecodable", "image_undecodable", "image_missing", "image_path_outside_root"
    ]  # fmt: skip
    assert again[4].notes == (FORMAT_MISMATCH, ANIMATED)
    # min_size is compared with the cached size, not part of the key: a looser checker decodes nothing either
    loose = ImageChecker(tmp_path, min_size=2, cache=ImageCheckCache(cache_folder(tmp_path)))
    assert loose.check_many(["a/small.png"])[0].size == (4, 30) and loose.decoded == 0
    # check() one path at a time shares the cache
    one = ImageChecker(tmp_path, min_size=8, cache=ImageCheckCache(cache_folder(tmp_path)))
    assert one.check("a/good.png").size == (40, 30) and one.decoded == 0


def test_the_key_is_the_content_and_the_settings(tmp_path, monkeypatch):
    write_png(tmp_path / "x.png", size=(20, 20))
    cache = ImageCheckCache(cache_folder(tmp_path))
    checker = ImageChecker(tmp_path, cache=cache)
    checker.check_many(["x.png"])
    shutil.copy(tmp_path / "x.png", tmp_path / "copy.png")  # the same bytes under another name: known
    assert checker.check_many(["copy.png"])[0].size == (20, 20) and checker.decoded == 1
    write_png(tmp_path / "x.png", size=(30, 20))  # other bytes under the same name: decoded again
    assert checker.check_many(["x.png"])[0].size == (30, 20) and checker.decoded == 2
    write_truncated_png(tmp_path / "x.png")  # a file that broke since: its new bytes fail
    assert checker.check_many(["x.png"])[0].reason == "image_undecodable" and checker.decoded == 3
    with monkeypatch.context() as m:  # another decompression-bomb limit: another key
        m.setattr(Image, "MAX_IMAGE_PIXELS", 20 * 20 // 4)
        assert checker.check_many(["copy.png"])[0].reason == "image_too_large" and checker.decoded == 4
    with monkeypatch.context() as m:  # a new version of the checks: another key
        m.setattr(image_cache, "VERSION", image_cache.VERSION + 1)
        assert checker.check_many(["copy.png"])[0].size == (20, 20) and checker.decoded == 5
    assert checker.check_many(["copy.png"])[0].size == (20, 20) and checker.decoded == 5  # the first key again


def _check_in_process(root: str, rels: list[str], out) -> None:
    checker = ImageChecker(root, min_size=8, cache=ImageCheckCache(cache_folder(root)))
    for _ in range(3):  # repeated: reads and writes of both processes interleave
        results = checker.check_many(rels)
    out.put((checker.decoded, verdicts(results)))


def test_two_processes_share_one_cache(tmp_path):
    for k in range(60):
        write_png(tmp_path / "many" / f"{k}.png", size=(10 + k, 12), color=(k, 2 * k, 3 * k))
    rels = [f"many/{k}.png" for k in range(60)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_check_in_process, args=(str(tmp_path), rels, out)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    reference = verdicts(ImageChecker(tmp_path, min_size=8).check_many(rels))
    assert all(v == reference for _, v in got)
    assert all(decoded <= len(rels) for decoded, _ in got)  # each decoded each file at most once
    import sqlite3

    with sqlite3.connect(cache_folder(tmp_path) / DB_NAME) as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT digest) FROM checks").fetchone() == (60, 60)
    third = ImageChecker(tmp_path, min_size=8, cache=ImageCheckCache(cache_folder(tmp_path)))
    assert verdicts(third.check_many(rels)) == reference and third.decoded == 0


def test_an_unusable_cache_is_switched_off_and_the_checks_still_decode(tmp_path, caplog):
    write_png(tmp_path / "x.png", size=(20, 20))
    folder = cache_folder(tmp_path)
    folder.mkdir()
    (folder / DB_NAME).write_bytes(b"this is not a database" * 100)
    checker = ImageChecker(tmp_path, cache=ImageCheckCache(folder))
    with caplog.at_level(logging.WARNING):
        assert checker.check_many(["x.png", "x.png"])[1].size == (20, 20)
    assert checker.decoded == 1 and checker.cache.disabled  # the same bytes twice in one batch: one decode
    assert "image check cache" in caplog.text and "switched off" in caplog.text


def test_second_hdf5_run_decodes_no_image_and_writes_the_same_bytes(tmp_path):
    cfg = small_workspace(tmp_path / "ws", hdf5={"phase2": {"num_workers": 2}})
    shutil.rmtree(cache_folder(cfg.image_root), ignore_errors=True)  # the conversion filled it: start empty
    with_image = sum("image" in json.loads(line) for line in cfg.jsonl_path("shapes_instruct").open())
    first = build_hdf5(cfg, "phase2")
    _, data, paths = read_phase(cfg.hdf5_dir("phase2"))
    assert first.images_decoded == with_image >= 15 and first.images_cached == 0
    second = build_hdf5(cfg, "phase2")
    assert second.images_decoded == 0 and second.images_cached == with_image
    _, data2, paths2 = read_phase(cfg.hdf5_dir("phase2"))
    assert (data2 == data).all() and paths2 == paths
    # the cache lives beside the raw data, ignored by git and DVC
    assert cache_folder(cfg.image_root).parent == cfg.path("raw")
    from tests.helpers_unit import PROJECT

    for ignore in (".dvcignore", ".gitignore"):
        assert "image-check-cache/" in (PROJECT / ignore).read_text().splitlines(), ignore


@pytest.mark.parametrize("broken", ["truncated", "replaced"])
def test_an_image_changed_between_runs_is_checked_again(tmp_path, broken):
    cfg = small_workspace(tmp_path / "ws")
    build_hdf5(cfg, "phase1")
    first = json.loads(cfg.jsonl_path("shapes_pretrain").read_text().splitlines()[0])
    image = cfg.image_root / first["image"]
    if broken == "truncated":
        write_truncated_png(image)
    else:
        write_png(image, size=(4, 4))  # below min_image_size
    r = build_hdf5(cfg, "phase1")
    assert r.images_decoded == 1
    assert r.discarded == {"image_undecodable" if broken == "truncated" else "image_too_small": 1}
