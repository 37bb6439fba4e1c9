"""Conversion of a LLaVA JSON array into jsonl: every dropped record is counted under its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_core.data.convert import convert, validate_record
from llava_core.data.converters import Drop
from llava_core.params import load_config
from tests.helpers_unit import base_params, write_params, write_png, write_truncated_png

SRC = "mysrc"


def make_cfg(tmp_path: Path, **dataset):
    params = base_params(tmp_path / "ws")
    params["sources"] = {SRC: {"kind": "local", "location": str(tmp_path / "origin")}}
    params["datasets"] = {
        "mydata": {"source": SRC, "file": "data.json", "converter": "llava_json", "phase": "phase2", **dataset}
    }
    return load_config(write_params(tmp_path, params))


def raw(cfg) -> Path:
    d = cfg.raw_dir(SRC)
    d.mkdir(parents=True, exist_ok=True)
    return d


def turn(frm, value):
    return {"from": frm, "value": value}


def qa(q="<image>\nWhat color is the circle?", a="red"):
    return [turn("human", q), turn("gpt", a)]


def write_source(cfg, records) -> Path:
    path = raw(cfg) / "data.json"
    path.write_text(json.dumps(records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def cfg(tmp_path):
    c = make_cfg(tmp_path)
    r = raw(c)
    write_png(r / "images" / "ok1.png")
    write_png(r / "images" / "ok2.png")
    write_png(r / "images" / "ok3.png")
    write_truncated_png(r / "images" / "broken.png")
    write_png(c.image_root / "other_source" / "x.png")  # inside the image root, outside this source
    write_png(tmp_path / "outside.png")  # outside the image root
    return c


def test_each_drop_reason_is_counted(cfg):
    valid = [
        {"id": "ok1", "image": "images/ok1.png", "conversations": qa()},
        {
            "id": 2,
            "image": "images/ok2.png",
            "conversations": qa("How many?\n<image>", "3") + qa("Where is the circle?", "top left"),
            "extra": 1,
        },
        {"id": "text1", "conversations": qa("Which shape has no corners?", "circle")},
    ]
    bad = [
        ("not_an_object", ["a list, not a record"]),
        ("not_an_object", "a string"),
        ("missing_fields", {"image": "images/ok1.png", "conversations": qa()}),  # no id
        ("missing_fields", {"id": "m2", "image": "images/ok1.png"}),  # no conversations
        ("missing_fields", {"id": "m3", "image": "images/ok1.png", "conversations": []}),
        ("missing_fields", {"id": "m4", "image": 5, "conversations": qa()}),  # image not a string
        (
            "odd_number_of_turns",
            {"id": "o1", "image": "images/ok1.png", "conversations": qa() + [turn("human", "and?")]},
        ),
        (
            "turns_not_alternating",
            {
                "id": "t1",
                "image": "images/ok1.png",
                "conversations": [turn("human", "<image>\nq"), turn("human", "q2")],
            },
        ),
        ("turns_not_alternating", {"id": "t2", "conversations": [turn("gpt", "a"), turn("human", "q")]}),
        ("malformed_turn", {"id": "mt", "conversations": [turn("human", "q"), {"from": "gpt", "value": 3}]}),
        ("image_placeholder_count", {"id": "p0", "image": "images/ok1.png", "conversations": qa("no placeholder")}),
        (
            "image_placeholder_count",
            {"id": "p2", "image": "images/ok1.png", "conversations": qa("<image>\n<image>\nq")},
        ),
        (
            "image_placeholder_count",
            {
                "id": "p3",
                "image": "images/ok1.png",  # placeholder not in the first turn
                "conversations": qa("q") + qa("<image>\nq2"),
            },
        ),
        ("image_placeholder_without_image", {"id": "w1", "conversations": qa()}),
        ("image_missing", {"id": "i1", "image": "images/nope.png", "conversations": qa()}),
        ("image_undecodable", {"id": "i2", "image": "images/broken.png", "conversations": qa()}),
        ("image_path_outside_root", {"id": "i3", "image": "../../outside.png", "conversations": qa()}),
        ("image_path_outside_root", {"id": "i4", "image": "images/../../../outside.png", "conversations": qa()}),
        ("duplicate_id", {"id": "ok1", "image": "images/ok3.png", "conversations": qa()}),
        ("duplicate_id", {"id": "2", "conversations": qa("q", "a")}),  # ids compare as strings
    ]
    records = [valid[0], *[b for _, b in bad[:10]], valid[1], *[b for _, b in bad[10:]], valid[2]]
    write_source(cfg, records)

    res = convert(cfg, "mydata")

    expected_dropped: dict[str, int] = {}
    for reason, _ in bad:
        expected_dropped[reason] = expected_dropped.get(reason, 0) + 1
    assert res.dropped == expected_dropped
    assert res.read == len(records) == 23
    assert res.written == 3
    assert res.read == res.written + sum(res.dropped.values())
    assert res.path == cfg.jsonl_path("mydata")

    out = read_jsonl(res.path)
    assert out == [
        {"id": "ok1", "image": f"{SRC}/images/ok1.png", "conversations": qa()},
        {
            "id": "2",
            "image": f"{SRC}/images/ok2.png",
            "conversations": qa("How many?\n<image>", "3") + qa("Where is the circle?", "top left"),
        },
        {"id": "text1", "conversations": qa("Which shape has no corners?", "circle")},
    ]
    # every written image path resolves under the image root
    for rec in out:
        if "image" in rec:
            assert (cfg.image_root / rec["image"]).is_file()

    report = json.loads(res.report_path.read_text())
    assert res.report_path == res.path.with_suffix(".report.json")
    assert report["read"] == 23 and report["written"] == 3
    assert report["dropped"] == dict(sorted(expected_dropped.items()))
    assert report["dropped_total"] == 20
    assert report["converter"] == "llava_json" and report["dataset"] == "mydata"
    assert report["source_file"] == (cfg.raw_dir(SRC) / "data.json").relative_to(cfg.root).as_posix()
    # no temporary files left next to the outputs
    assert sorted(p.name for p in res.path.parent.iterdir()) == ["mydata.jsonl", "mydata.report.json"]


def test_absolute_image_path_is_rejected(cfg, tmp_path):
    write_png(cfg.raw_dir(SRC) / str(tmp_path / "outside.png").lstrip("/"))  # a file the prefixed path hits
    write_source(
        cfg,
        [
            {"id": "a1", "image": str(tmp_path / "outside.png"), "conversations": qa()},
            {"id": "a2", "image": "/etc/passwd", "conversations": qa()},
        ],
    )
    res = convert(cfg, "mydata")
    assert res.written == 0
    assert res.dropped == {"image_path_outside_root": 2}


def test_absolute_path_rejected_without_prefix(tmp_path):
    # with an empty image prefix the absolute path reaches resolve_image unchanged and is refused
    c = make_cfg(tmp_path, image_prefix="")
    write_png(tmp_path / "outside.png")
    write_source(c, [{"id": "a1", "image": str(tmp_path / "outside.png"), "conversations": qa()}])
    res = convert(c, "mydata")
    assert (res.read, res.written, res.dropped) == (1, 0, {"image_path_outside_root": 1})


def test_custom_image_prefix(tmp_path):
    c = make_cfg(tmp_path, image_prefix="coco/train2017/")
    write_png(c.image_root / "coco" / "train2017" / "000001.jpg")
    write_source(c, [{"id": 1, "image": "000001.jpg", "conversations": qa()}])
    res = convert(c, "mydata")
    assert read_jsonl(res.path) == [{"id": "1", "image": "coco/train2017/000001.jpg", "conversations": qa()}]


def test_check_images_false_skips_decoding_but_not_paths(cfg):
    write_source(
        cfg,
        [
            {"id": "b", "image": "images/broken.png", "conversations": qa()},
            {"id": "m", "image": "images/nope.png", "conversations": qa()},
            {"id": "o", "image": "../../outside.png", "conversations": qa()},
        ],
    )
    res = convert(cfg, "mydata", check_images=False)
    assert res.written == 2
    assert res.dropped == {"image_path_outside_root": 1}


def test_invalid_json_names_the_file(cfg):
    path = raw(cfg) / "data.json"
    path.write_text('[{"id": 1, ')
    with pytest.raises(ValueError) as ei:
        convert(cfg, "mydata")
    assert str(path) in str(ei.value)
    assert "not valid JSON" in str(ei.value)
    assert not cfg.jsonl_path("mydata").exists()


def test_json_not_an_array(cfg):
    path = raw(cfg) / "data.json"
    path.write_text('{"id": 1}')
    with pytest.raises(ValueError) as ei:
        convert(cfg, "mydata")
    assert str(path) in str(ei.value) and "expected a JSON array" in str(ei.value)


def test_not_utf8_names_the_file(cfg):
    path = raw(cfg) / "data.json"
    path.write_bytes(b'["\xff\xfe"]')
    with pytest.raises(ValueError) as ei:
        convert(cfg, "mydata")
    assert str(path) in str(ei.value) and "not UTF-8" in str(ei.value)


def test_missing_source_file_and_unknown_dataset(cfg):
    with pytest.raises(FileNotFoundError, match="download source 'mysrc' first"):
        convert(cfg, "mydata")
    with pytest.raises(KeyError, match="unknown dataset 'other'"):
        convert(cfg, "other")


def test_rerun_replaces_output(cfg):
    write_source(
        cfg,
        [
            {"id": "ok1", "image": "images/ok1.png", "conversations": qa()},
            {"id": "ok2", "image": "images/ok2.png", "conversations": qa()},
        ],
    )
    assert convert(cfg, "mydata").written == 2
    write_source(cfg, [{"id": "ok3", "image": "images/ok3.png", "conversations": qa()}])
    res = convert(cfg, "mydata")
    assert [r["id"] for r in read_jsonl(res.path)] == ["ok3"]
    assert json.loads(res.report_path.read_text())["read"] == 1


def test_validate_record_unicode_kept(cfg):
    rec = validate_record(
        {"id": "u", "conversations": qa("Qu'est-ce que c'est ?", "un cercle — rouge")}, cfg.image_root, f"{SRC}/"
    )
    assert rec == {"id": "u", "conversations": qa("Qu'est-ce que c'est ?", "un cercle — rouge")}
    with pytest.raises(Drop) as ei:
        validate_record({"id": "x", "conversations": "nope"}, cfg.image_root, f"{SRC}/")
    assert ei.value.reason == "missing_fields"
