"""Great Expectations gates over the jsonl records and the HDF5 examples of a phase."""

from __future__ import annotations

import json
import shutil

import h5py
import pytest

from llava_core.cli import main
from llava_core.data.hdf5_writer import build_hdf5
from llava_core.data.validate import hdf5_frame, validate_phase
from llava_core.params import load_config
from tests.helpers_hdf5 import TEXT_ONLY_EXTRA, small_workspace
from tests.helpers_unit import base_params, write_params

PHASES = ("phase1", "phase2")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cfg = small_workspace(tmp_path_factory.mktemp("val"), extra={"shapes_instruct": [TEXT_ONLY_EXTRA]})
    for phase in PHASES:
        build_hdf5(cfg, phase)
    return cfg


@pytest.mark.parametrize("phase", PHASES)
def test_built_data_passes_and_results_sit_beside_the_hdf5(cfg, phase):
    r = validate_phase(cfg, phase)
    assert r.success, r.summary()
    assert r.path == cfg.hdf5_dir(phase).with_name(f"{phase}.validation.json") == cfg.validation_path(phase)
    saved = json.loads(r.path.read_text())
    assert saved["success"] is True and saved["phase"] == phase
    assert saved["hdf5"] == f"data/hdf5/{phase}"
    examples = json.loads((cfg.hdf5_dir(phase) / "data_params.json").read_text())["examples"]
    assert saved["suites"]["hdf5"]["rows"] == examples
    assert saved["suites"]["jsonl"]["rows"] == 20 + (phase == "phase2")
    checked = {e["kwargs"].get("column") for e in saved["suites"]["hdf5"]["expectations"]}
    assert {
        "seq_len",
        "max_token_id",
        "loss_tokens",
        "labels_are_shifted_inputs",
        "slot_padding_mask_ok",
        "image_path_resolvable",
    } <= checked
    first = r.path.read_bytes()
    validate_phase(cfg, phase)
    assert r.path.read_bytes() == first  # no timestamps or random ids: DVC sees the same file
    assert "passed" in r.summary().splitlines()[0]


def test_frame_facts_on_a_text_only_example(cfg):
    frame, params = hdf5_frame(cfg.hdf5_dir("phase2"), cfg.image_root)
    text_only = frame[~frame["has_image"]]
    assert len(text_only) == params["text_only_examples"] >= 1
    assert text_only["slot_padding_mask_ok"].all() and text_only["image_path_resolvable"].all()
    assert (frame["loss_tokens"] >= 1).all() and (frame["loss_outside_answers"] == 0).all()
    assert frame["max_token_id"].max() < params["vocab_size"]


def _edit_row(folder, edit):
    """Apply `edit(row)` to example 2 of the first file; returns where it is (as the summary names it)."""
    name = json.loads((folder / "data_params.json").read_text())["files"][0]["file"]
    with h5py.File(folder / name, "r+") as h5:
        row = h5["data"][2]
        edit(row, json.loads((folder / "data_params.json").read_text()))
        h5["data"][2] = row
        path = h5["img_path"][2, 0]
    return f"{name}[2]", path.decode() if isinstance(path, bytes) else str(path)


def _start(p):
    return p["image_patch_info"]["image_patch_start_idx"]


def _eos_as_input(row, p):
    """The layout before Cerebras' construction: the final `</s>` also an attended input, with a pad label."""
    n = int((row[3] == 0).nonzero()[0].max()) + 1
    row[0][n], row[2][n], row[3][n] = p["eos_id"], p["pad_id"], 0


CORRUPTIONS = {
    "ends_with_eos": _eos_as_input,
    "max_token_id": lambda row, p: row[0].__setitem__(_start(p) - 1, p["vocab_size"] + 5),
    "labels_are_shifted_inputs": lambda row, p: row[2].__setitem__(0, row[2][0] + 1),
    "image_slots_are_pad": lambda row, p: row[0].__setitem__(_start(p) + 1, 7),
    "slot_padding_mask_ok": lambda row, p: row[3].__setitem__(_start(p), 1 - row[3][_start(p)]),
    "loss_tokens": lambda row, p: row[1].__setitem__(slice(None), 0),
    "loss_outside_answers": lambda row, p: row[1].__setitem__(_start(p), 1),
    "first_is_bos": lambda row, p: row[0].__setitem__(0, p["eos_id"]),
}


@pytest.mark.parametrize("column", sorted(CORRUPTIONS))
def test_each_corruption_fails_its_expectation_naming_the_row(cfg, tmp_path, column):
    folder = cfg.hdf5_dir("phase2")
    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)
    try:
        where, _ = _edit_row(folder, CORRUPTIONS[column])
        r = validate_phase(cfg, "phase2")
    finally:
        shutil.rmtree(folder)
        shutil.copytree(backup, folder)
    assert not r.success and r.suites["jsonl"].success
    failed = [e for e in r.suites["hdf5"].expectations if not e["success"]]
    assert column in {e["kwargs"].get("column") for e in failed}
    hit = next(e for e in failed if e["kwargs"].get("column") == column)
    assert hit["unexpected_count"] == 1 and hit["examples"] == [where]
    assert f"x {column}:" in r.summary() and where in r.summary()
    assert json.loads(r.path.read_text())["success"] is False


def test_missing_image_after_writing_fails_the_hdf5_suite(cfg, tmp_path):
    folder = cfg.hdf5_dir("phase1")
    where, rel = _edit_row(folder, lambda row, p: None)
    image = cfg.image_root / rel
    moved = tmp_path / "moved.png"
    shutil.move(image, moved)
    try:
        r = validate_phase(cfg, "phase1")
    finally:
        shutil.move(moved, image)
    failed = {e["kwargs"].get("column"): e for s in r.suites.values() for e in s.expectations if not e["success"]}
    assert set(failed) == {"image_path_resolvable"}
    assert failed["image_path_resolvable"]["examples"] == [where]


def test_bad_jsonl_records_and_the_discard_gate(tmp_path, capsys):
    bad = [
        "{broken",
        {"id": "odd", "conversations": [{"from": "human", "value": "Q?"}]},
        {
            "id": "esc",
            "image": "../x.png",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}],
        },
        {
            "id": "two",
            "image": "synthetic_shapes/images/it_000000.png",
            "conversations": [{"from": "human", "value": "<image>\n<image>\nQ?"}, {"from": "gpt", "value": "A"}],
        },
    ]
    cfg = small_workspace(tmp_path / "ws", extra={"shapes_instruct": bad})
    build_hdf5(cfg, "phase2")  # the writer rejects the 4 and counts them (4 of 24 > 5%)
    r = validate_phase(cfg, "phase2")
    jsonl = {e["kwargs"].get("column", "table"): e for e in r.suites["jsonl"].expectations if not e["success"]}
    assert set(jsonl) == {
        "parsed",
        "key",
        "turns",
        "conversation_ok",
        "image_path_resolvable",
        "placeholders_match_image",
    }
    assert jsonl["turns"]["unexpected_count"] == 2  # the broken line (0 turns) and the odd one
    assert jsonl["parsed"]["examples"] == ["shapes_instruct.jsonl:21"]
    assert jsonl["conversation_ok"]["unexpected_count"] == 2  # the broken line and the odd one
    hdf5 = [e for e in r.suites["hdf5"].expectations if not e["success"]]
    assert [(e["expectation"], e["kwargs"]) for e in hdf5] == [
        ("expect_table_row_count_to_be_between", {"min_value": 23})
    ]

    # the same data passes the discard gate when the phase allows 20% rejections, still fails the jsonl suite
    params = base_params(tmp_path / "ws")
    params["hdf5"]["phase2"]["max_discarded_fraction"] = 0.2
    loose = load_config(write_params(tmp_path / "ws", params, name="loose.yaml"))
    assert validate_phase(loose, "phase2").suites["hdf5"].success

    # the CLI (what the DVC stage runs): exit status 1 and the readable summary on stderr
    assert main(["--params", str(tmp_path / "ws" / "params.yaml"), "validate", "phase2"]) == 1
    err = capsys.readouterr().err
    assert "validation of phase2 FAILED (7 of 21 expectations)" in err
    assert (
        "x parsed: column_values_to_be_in_set(value_set=[True]): 1 of 24 rows fail, e.g. shapes_instruct.jsonl:21"
        in err
    )
    assert "x table: table_row_count_to_be_between(min_value=23)" in err


def test_cli_passes_on_good_data(cfg, capsys):
    assert main(["--params", str(cfg.base_dir / "params.yaml"), "validate", "phase1"]) == 0
    assert "validation of phase1 passed" in capsys.readouterr().out


def test_validate_before_building_is_a_clear_error(tmp_path):
    cfg = load_config(write_params(tmp_path, base_params(tmp_path / "ws")))
    with pytest.raises(FileNotFoundError, match="run `llava-pipeline hdf5 phase2` first"):
        validate_phase(cfg, "phase2")
