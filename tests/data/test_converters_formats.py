"""Each upstream format converter on small inputs written in that format: exact records and drop reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_core.config import ConfigError
from llava_core.data.convert import convert
from llava_core.data.converters import BRIEF_PROMPTS, CAPTION_PROMPT, CONVERTERS
from llava_core.data.prompts import PROMPT_SUFFIXES
from llava_core.params import load_config
from tests.helpers_unit import base_params, png_bytes, write_params, write_png

SRC = "up"


def make_cfg(tmp_path: Path, converter: str, file: str, **extra):
    params = base_params(tmp_path / "ws")
    params["sources"] = {SRC: {"kind": "local", "location": str(tmp_path / "origin")}}
    params["datasets"] = {"d": {"source": SRC, "file": file, "converter": converter, "phase": "phase2", **extra}}
    cfg = load_config(write_params(tmp_path, params))
    cfg.raw_dir(SRC).mkdir(parents=True, exist_ok=True)
    return cfg


def put_json(cfg, rel: str, data) -> Path:
    path = cfg.raw_dir(SRC) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def img(cfg, rel: str) -> None:
    write_png(cfg.raw_dir(SRC) / rel)


def records(res) -> list[dict]:
    return [json.loads(line) for line in res.path.read_text().splitlines()]


def qa(rec_id, image, q, a):
    rec = {"id": rec_id, "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
    if image is not None:
        rec = {"id": rec_id, "image": image, "conversations": rec["conversations"]}
    return rec


def check_report(res, read, written, dropped):
    assert (res.read, res.written, res.dropped) == (read, written, dropped)
    report = json.loads(res.report_path.read_text())
    assert report["read"] == report["written"] + report["dropped_total"]


def test_registry_names():
    assert sorted(CONVERTERS) == [
        "ai2d",
        "arxivcap",
        "arxivqa",
        "chartqa",
        "docvqa",
        "dvqa",
        "infographicvqa",
        "llava_json",
        "synthdog",
    ]


def test_unknown_converter_and_option_name_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"datasets\.d\.converter: unknown converter 'vqa'; valid: ai2d, arxivcap, "):
        make_cfg(tmp_path, "vqa", "x.json")
    with pytest.raises(
        ConfigError,
        match=r"datasets\.d\.options: unknown key\(s\) \['split'\] for converter 'dvqa'; valid: \['image_folder', 'suffix'\]",
    ):
        make_cfg(tmp_path, "dvqa", "x.json", options={"split": "val"})


def test_ai2d(tmp_path):
    cfg = make_cfg(tmp_path, "ai2d", "questions")
    img(cfg, "images/0.png")
    put_json(
        cfg,
        "questions/0.png.json",
        {
            "imageName": "0.png",
            "questions": {
                "Which stage comes first?": {
                    "questionId": "0.png-0",
                    "answerTexts": ["egg", "larva", "adult"],
                    "correctAnswer": 1,
                    "abcLabel": False,
                },
                "How many legs?": {"questionId": "0.png-1", "answerTexts": ["6", "8"], "correctAnswer": 2},
                "Broken?": {"questionId": "0.png-2", "answerTexts": ["x"]},
            },
        },
    )
    put_json(
        cfg,
        "questions/1.png.json",
        {
            "imageName": "1.png",
            "questions": {"q?": {"questionId": "1.png-0", "answerTexts": ["a", "b"], "correctAnswer": 0}},
        },
    )
    put_json(cfg, "questions/2.png.json", {"questions": {}})  # no imageName
    res = convert(cfg, "d")
    assert records(res) == [
        qa("0.png-0", f"{SRC}/images/0.png", "Which stage comes first? a) egg b) larva c) adult", "b) larva")
    ]
    check_report(res, 5, 1, {"answer_out_of_range": 1, "missing_fields": 2, "image_missing": 1})


def test_arxivqa(tmp_path):
    cfg = make_cfg(tmp_path, "arxivqa", "arxivqa.jsonl")
    img(cfg, "images/a.jpg")
    lines = [
        {
            "id": "q1",
            "image": "images/a.jpg",
            "question": "Which curve rises?",
            "options": ["A) red", "B) blue"],
            "label": "B",
            "rationale": "Blue increases with x.",
        },
        {"id": "q2", "image": "images/a.jpg", "question": "Trend?", "options": [], "label": "Upward", "rationale": ""},
        {"id": "q3", "image": "images/a.jpg", "question": "Pick", "options": ["A) x"], "label": "(A)", "rationale": ""},
        {"id": "q4", "image": "images/a.jpg", "question": "Pick", "options": ["A) x"], "label": "C", "rationale": "r"},
        {"id": "q5", "image": "images/a.jpg", "question": "Pick", "options": ["A) x"], "label": "", "rationale": ""},
        {"id": "q6", "image": "images/a.jpg", "options": ["A) x"], "label": "A"},
        {"id": "q7", "image": "../../../etc/x.jpg", "question": "Pick", "options": ["A) x"], "label": "A"},
    ]
    path = cfg.raw_dir(SRC) / "arxivqa.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n\n")
    res = convert(cfg, "d")
    assert records(res) == [
        qa("q1", f"{SRC}/images/a.jpg", "Which curve rises?\nA) red\nB) blue", "B) blue\nBlue increases with x."),
        qa("q2", f"{SRC}/images/a.jpg", "Trend?", "Upward"),
        qa("q3", f"{SRC}/images/a.jpg", "Pick\nA) x", "A) x"),
    ]
    check_report(
        res,
        8,
        3,
        {
            "answer_out_of_range": 1,
            "empty_answer": 1,
            "missing_fields": 1,
            "image_path_outside_root": 1,
            "invalid_json": 1,
        },
    )


def test_chartqa_every_split_and_part(tmp_path):
    cfg = make_cfg(tmp_path, "chartqa", ".")
    img(cfg, "train/png/c1.png")
    img(cfg, "val/png/c2.png")
    put_json(cfg, "train/train_human.json", [{"imgname": "c1.png", "query": "Max value?", "label": "42"}])
    put_json(
        cfg,
        "train/train_augmented.json",
        [{"imgname": "c1.png", "query": "Min value?", "label": 3.5}, {"imgname": "c1.png", "query": "No label"}],
    )
    put_json(cfg, "val/val_human.json", [{"imgname": "c2.png", "query": "Which year?", "label": "2019"}])
    res = convert(cfg, "d")
    assert records(res) == [
        qa("chartqa-train-augmented-0", f"{SRC}/train/png/c1.png", "Min value?", "3.5"),
        qa("chartqa-train-human-0", f"{SRC}/train/png/c1.png", "Max value?", "42"),
        qa("chartqa-val-human-0", f"{SRC}/val/png/c2.png", "Which year?", "2019"),
    ]
    check_report(res, 4, 3, {"missing_fields": 1})
    # one split, one part, through a glob
    cfg2 = make_cfg(tmp_path / "two", "chartqa", "val/val_human.json")
    img(cfg2, "val/png/c2.png")
    put_json(cfg2, "val/val_human.json", [{"imgname": "c2.png", "query": "Which year?", "label": "2019"}])
    put_json(cfg2, "val/val_augmented.json", [{"imgname": "c2.png", "query": "x", "label": "y"}])
    assert [r["id"] for r in records(convert(cfg2, "d"))] == ["chartqa-val-human-0"]


def test_docvqa_and_infographicvqa(tmp_path):
    cfg = make_cfg(tmp_path, "docvqa", "spdocvqa/val.json")
    img(cfg, "spdocvqa/documents/p1.png")
    put_json(
        cfg,
        "spdocvqa/val.json",
        {
            "dataset_name": "docvqa",
            "data": [
                {
                    "questionId": 7,
                    "question": "What is the date?",
                    "image": "documents/p1.png",
                    "answers": ["1 May 1990", "May 1, 1990"],
                },
                {"questionId": 8, "question": "Title?", "image": "documents/p1.png", "answers": []},
                {"questionId": 9, "question": "Gone?", "image": "documents/p9.png", "answers": ["x"]},
            ],
        },
    )
    res = convert(cfg, "d")
    assert records(res) == [qa("docvqa-7", f"{SRC}/spdocvqa/documents/p1.png", "What is the date?", "1 May 1990")]
    check_report(res, 3, 1, {"missing_fields": 1, "image_missing": 1})

    cfg2 = make_cfg(
        tmp_path / "info",
        "infographicvqa",
        "infographicsVQA_train.json",
        options={"image_folder": "infographicsvqa_images"},
    )
    img(cfg2, "infographicsvqa_images/10.jpeg")
    put_json(
        cfg2,
        "infographicsVQA_train.json",
        {
            "data": [
                {"questionId": 1, "question": "How many?", "image_local_name": "10.jpeg", "answers": ["12"]},
                {"questionId": 2, "question": "How many?", "image": "10.jpeg", "answers": ["12"]},
            ]
        },
    )
    res2 = convert(cfg2, "d")
    assert records(res2) == [qa("infovqa-1", f"{SRC}/infographicsvqa_images/10.jpeg", "How many?", "12")]
    check_report(res2, 2, 1, {"missing_fields": 1})


def test_dvqa(tmp_path):
    cfg = make_cfg(tmp_path, "dvqa", "qa/train_qa.json")
    img(cfg, "images/bar_1.png")
    put_json(
        cfg,
        "qa/train_qa.json",
        [
            {
                "question_id": 11,
                "image": "bar_1.png",
                "question": "What is the label of the first bar?",
                "answer": "cat",
                "template_id": "data",
            },
            {"question_id": 12, "image": "bar_1.png", "question": "How many bars?", "answer": 3},
            {"question_id": 13, "image": "bar_1.png", "question": "Empty?", "answer": ""},
            {"question_id": 11, "image": "bar_1.png", "question": "again", "answer": "dup"},
            "junk",
        ],
    )
    res = convert(cfg, "d")
    assert records(res) == [
        qa("dvqa-11", f"{SRC}/images/bar_1.png", "What is the label of the first bar?", "cat"),
        qa("dvqa-12", f"{SRC}/images/bar_1.png", "How many bars?", "3"),
    ]
    check_report(res, 5, 2, {"missing_fields": 1, "duplicate_id": 1, "not_an_object": 1})


QUESTION_CONVERTERS = ("ai2d", "arxivqa", "chartqa", "docvqa", "dvqa", "infographicvqa", "llava_json")


def test_the_converters_that_ask_questions_take_the_suffix_option():
    assert sorted(n for n, c in CONVERTERS.items() if "suffix" in c.options) == list(QUESTION_CONVERTERS)
    assert all(CONVERTERS[n].options["suffix"] == "none" for n in QUESTION_CONVERTERS)  # off by default


@pytest.mark.parametrize("suffix", ["short_answer", "multiple_choice", "none"])
def test_dvqa_with_an_evaluation_suffix(tmp_path, suffix):
    """As LLaVA-1.5's mix665k writes its VQA questions: the suffix on its own line after the question."""
    cfg = make_cfg(tmp_path, "dvqa", "qa/train_qa.json", options={"suffix": suffix})
    img(cfg, "images/bar_1.png")
    put_json(
        cfg, "qa/train_qa.json", [{"question_id": 1, "image": "bar_1.png", "question": "How many bars?", "answer": 3}]
    )
    res = convert(cfg, "d")
    question = "How many bars?" + ("" if suffix == "none" else f"\n{PROMPT_SUFFIXES[suffix]}")
    assert records(res) == [qa("dvqa-1", f"{SRC}/images/bar_1.png", question, "3")]
    assert json.loads(res.report_path.read_text())["options"] == {"image_folder": "images", "suffix": suffix}


def test_llava_json_suffix_on_every_human_turn_without_one(tmp_path):
    short, mc = PROMPT_SUFFIXES["short_answer"], PROMPT_SUFFIXES["multiple_choice"]
    cfg = make_cfg(tmp_path, "llava_json", "mix.json", options={"suffix": "short_answer"})
    img(cfg, "coco/1.jpg")
    turns = [
        {"from": "human", "value": "What is it?\n<image>"},  # the placeholder at the end, as some mix665k records
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": f"Which?\nA. cat\nB. dog\n{mc}"},  # already has one: left alone
        {"from": "gpt", "value": "A"},
        {"from": "human", "value": f"Color?\n{short}"},  # not twice
        {"from": "gpt", "value": "Grey."},
    ]
    put_json(cfg, "mix.json", [{"id": "1", "image": "coco/1.jpg", "conversations": turns}])
    [rec] = records(convert(cfg, "d"))
    assert [t["value"] for t in rec["conversations"]] == [
        f"What is it?\n<image>\n{short}",
        "A cat.",
        f"Which?\nA. cat\nB. dog\n{mc}",
        "A",
        f"Color?\n{short}",
        "Grey.",
    ]


def test_llava_json_glob_of_several_files(tmp_path):
    cfg = make_cfg(tmp_path, "llava_json", "parts/*.json")
    img(cfg, "coco/1.jpg")
    put_json(cfg, "parts/a.json", [qa("1", "coco/1.jpg", "Describe.", "A cat.")])
    put_json(cfg, "parts/b.json", [qa("2", "coco/1.jpg", "Describe.", "A cat.") | {"image": "coco/2.jpg"}, 5])
    res = convert(cfg, "d")
    assert records(res) == [qa("1", f"{SRC}/coco/1.jpg", "Describe.", "A cat.")]
    check_report(res, 3, 1, {"image_missing": 1, "not_an_object": 1})


def test_no_matching_file_is_a_clear_error(tmp_path):
    cfg = make_cfg(tmp_path, "chartqa", "test/*.json")
    with pytest.raises(FileNotFoundError, match="matches no file.*download source 'up' first"):
        convert(cfg, "d")


# --- parquet formats ------------------------------------------------------------------------------------------
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def test_arxivcap_writes_images_and_keeps_single_figures(tmp_path):
    cfg = make_cfg(tmp_path, "arxivcap", "data")
    good, other = png_bytes((20, 12)), png_bytes((8, 8), color=(0, 0, 255))
    rows = [
        [
            {
                "caption": "Loss curves of the models.",
                "cil_pairs": [{"image_file": "f1.png", "image": {"bytes": good}}],
            },
            {
                "caption": "Two panels.",
                "cil_pairs": [
                    {"image_file": "a.png", "image": {"bytes": good}},
                    {"image_file": "b.png", "image": {"bytes": other}},
                ],
            },
        ],
        [
            {"caption": "", "cil_pairs": [{"image_file": "c.png", "image": {"bytes": good}}]},
            {"caption": "No image.", "cil_pairs": [{"image_file": "d.png", "image": {"bytes": None}}]},
            {"caption": "Broken.", "cil_pairs": [{"image_file": "e.png", "image": {"bytes": b"\x89PNG junk"}}]},
            {"caption": "Blue square.", "cil_pairs": [{"image_file": "g.png", "image": {"bytes": other}}]},
        ],
    ]
    folder = cfg.raw_dir(SRC) / "data"
    folder.mkdir()
    pq.write_table(pa.table({"caption_images": rows, "arxiv_id": ["1", "2"]}), folder / "part-0.parquet")
    res = convert(cfg, "d")
    base = f"{SRC}/extracted/d"
    assert records(res) == [
        qa("arxivcap-part-0-0-0", f"{base}/000_0000000_00.png", CAPTION_PROMPT, "Loss curves of the models."),
        qa("arxivcap-part-0-1-3", f"{base}/000_0000001_03.png", CAPTION_PROMPT, "Blue square."),
    ]
    check_report(res, 6, 2, {"multiple_images": 1, "missing_fields": 1, "image_missing": 1, "image_undecodable": 1})
    out = cfg.raw_dir(SRC) / "extracted" / "d"
    assert (out / "000_0000000_00.png").read_bytes() == good
    assert (out / "000_0000001_03.png").read_bytes() == other
    assert sorted(p.name for p in (cfg.raw_dir(SRC) / "extracted").iterdir()) == ["d"]  # no partial folder left
    for rec in records(res):
        assert (cfg.image_root / rec["image"]).is_file()


def test_synthdog_seeded_prompt_choice(tmp_path):
    cfg = make_cfg(tmp_path, "synthdog", "data/*.parquet", options={"seed": 3})
    jpg = png_bytes()
    gts = [
        json.dumps({"gt_parse": {"text_sequence": "Hello world"}}),
        "{bad json",
        json.dumps({"gt_parse": {"text_sequence": "Second page"}}),
        json.dumps({"gt_parse": {"text_sequence": "No image"}}),
    ]
    images = [{"bytes": jpg, "path": None}] * 3 + [{"bytes": None, "path": None}]
    folder = cfg.raw_dir(SRC) / "data"
    folder.mkdir()
    pq.write_table(pa.table({"image": images, "ground_truth": gts}), folder / "train-00000.parquet")
    res = convert(cfg, "d")
    import random

    rng = random.Random(3)
    prompts = [rng.choice(BRIEF_PROMPTS) for _ in range(4)]
    base = f"{SRC}/extracted/d"
    assert records(res) == [
        qa("synthdog-train-00000-0", f"{base}/000_0000000.png", prompts[0], "Hello world"),
        qa("synthdog-train-00000-2", f"{base}/000_0000002.png", prompts[2], "Second page"),
    ]
    check_report(res, 4, 2, {"missing_fields": 1, "image_missing": 1})
    # reproducible: the same seed gives the same file
    first = res.path.read_text()
    assert convert(cfg, "d").path.read_text() == first
    # the pipeline seed is the default when the dataset sets none
    cfg2 = make_cfg(tmp_path / "s", "synthdog", "data/*.parquet")
    (cfg2.raw_dir(SRC) / "data").mkdir()
    pq.write_table(pa.table({"image": images, "ground_truth": gts}), cfg2.raw_dir(SRC) / "data" / "t.parquet")
    rng0 = random.Random(cfg2.seed)
    assert records(convert(cfg2, "d"))[0]["conversations"][0]["value"] == "<image>\n" + rng0.choice(BRIEF_PROMPTS)


def test_parquet_missing_column_names_file(tmp_path):
    cfg = make_cfg(tmp_path, "synthdog", "x.parquet")
    pq.write_table(pa.table({"image": [{"bytes": b"x"}]}), cfg.raw_dir(SRC) / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: missing column\(s\) \['ground_truth'\]"):
        convert(cfg, "d")
