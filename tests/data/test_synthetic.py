"""The embedded default source: questions and conversations say what the scene shows, and the same seed gives
the same bytes."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from llava_core.data import synthetic
from llava_core.data.synthetic import COLORS, SHAPES, SHORT_ANSWER, PlacedShape, ShapesOptions

SMALL = {"num_pretrain": 3, "num_instruct": 30, "num_eval_images": 12, "image_size": 32}
SCENE = [PlacedShape("circle", "red", "top left"), PlacedShape("cross", "blue", "bottom right")]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        synthetic.generate(tmp_path / name, ShapesOptions(**SMALL, seed=seed))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert (tmp_path / "a/instruct.json").read_bytes() != (tmp_path / "c/instruct.json").read_bytes()


def test_held_out_questions_match_the_scene_and_are_balanced():
    qas = synthetic.questions_for(SCENE, random.Random(0))
    assert Counter(c for c, _, _ in qas) == {"color": 1, "count": 1, "exists": 2, "position": 1, "color_exists": 2}
    by = {q: a for _, q, a in qas}
    for category, q, a in qas:
        if category == "count":
            assert a == "2"
        elif category == "color":
            shape = q.removeprefix("What color is the ").removesuffix(" in the image?")
            assert a == {"circle": "red", "cross": "blue"}[shape]
        elif category == "position":
            shape = q.removeprefix("Where is the ").removesuffix(" in the image?")
            assert a == {"circle": "top left", "cross": "bottom right"}[shape]
    # one yes and one no per POPE kind, each answer true of the scene
    for kind in ("exists", "color_exists"):
        assert sorted(a for c, _, a in qas if c == kind) == ["no", "yes"]
    for q, a in by.items():
        if q.startswith("Is there a "):
            word = q.removeprefix("Is there a ").split()[0]
            assert a == ("yes" if word in {"circle", "cross", "red", "blue"} else "no"), q


def test_training_conversation_asks_every_colour_and_shape_kind():
    conv = synthetic.training_conversation(SCENE, random.Random(0), ShapesOptions(caption_fraction=0.0))
    humans, answers = conv[0::2], conv[1::2]
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    # <image> once, in the first turn; the short-answer instruction after the first question only
    assert humans[0]["value"].startswith("<image>\n") and humans[0]["value"].endswith(f"\n{SHORT_ANSWER}")
    assert all("<image>" not in t["value"] and SHORT_ANSWER not in t["value"] for t in humans[1:])
    qa = {
        h["value"].removeprefix("<image>\n").removesuffix(f"\n{SHORT_ANSWER}"): a["value"]
        for h, a in zip(humans, answers, strict=True)
    }
    for shape in SHAPES:
        assert qa[synthetic.shape_question(shape)] == ("yes" if shape in {"circle", "cross"} else "no")
    for color in COLORS:
        assert qa[synthetic.color_question(color)] == ("yes" if color in {"red", "blue"} else "no")
    assert qa["How many shapes are there in the image?"] == "2"
    assert len(qa) == len(SHAPES) + len(COLORS) + 3  # + colour of a shape, count, place of a shape


def test_conversation_options_pair_questions_and_suffix_on_every_turn():
    opts = ShapesOptions(
        exhaustive_yes_no=False, suffix_every_turn=True, kinds_per_conversation=(2, 2), caption_fraction=0
    )
    for seed in range(20):
        conv = synthetic.training_conversation(SCENE, random.Random(seed), opts)
        humans = [t["value"] for t in conv[0::2]]
        assert all(h.endswith(f"\n{SHORT_ANSWER}") for h in humans)
        kinds = Counter("yes/no" if h.removeprefix("<image>\n").startswith("Is there") else h for h in humans)
        assert len(humans) in (2, 3, 4)  # two kinds; a yes/no kind brings its yes and its no
        assert kinds.get("yes/no", 0) in (0, 2, 4)


def test_generated_files_hold_what_the_records_point_at(tmp_path):
    counts = synthetic.generate(tmp_path, ShapesOptions(**SMALL))
    pretrain = json.loads((tmp_path / "pretrain.json").read_text())
    instruct = json.loads((tmp_path / "instruct.json").read_text())
    questions = [json.loads(line) for line in (tmp_path / "eval_questions.jsonl").read_text().splitlines()]
    assert counts == {"pretrain": 3, "instruct": 30, "eval_questions": 7 * 12}
    assert len(pretrain) == 3 and len(instruct) == 30 and len(questions) == 7 * 12
    for rec in pretrain + instruct:
        if "image" in rec:
            assert (tmp_path / rec["image"]).is_file()
            assert sum(t["value"].count("<image>") for t in rec["conversations"]) == 1
    for q in questions:
        assert (tmp_path / q["image"]).is_file() and q["image"].startswith("eval_images/")
    per_image = Counter(q["image"] for q in questions)
    assert set(per_image.values()) == {7}
    for kind in ("exists", "color_exists"):
        assert Counter(q["answers"][0] for q in questions if q["category"] == kind) == {"yes": 12, "no": 12}
    # held-out images are not training images
    train_images = {rec.get("image") for rec in pretrain + instruct}
    assert not {q["image"] for q in questions} & train_images


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"kinds_per_conversation": [3, 2]}, "kinds_per_conversation"),
        ({"kinds_per_conversation": [0, 5]}, "kinds_per_conversation"),
        ({"kinds_per_conversation": [1, 6]}, "kinds_per_conversation"),
        ({"caption_fraction": 1.5}, "caption_fraction"),
        ({"num_instruct": 0}, "num_instruct"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_bad_options_are_errors_that_name_them(bad, message):
    with pytest.raises(ValueError, match=message):
        ShapesOptions(**bad)


def test_options_from_params_yaml_lists():
    assert ShapesOptions(kinds_per_conversation=[2, 3]).kinds_per_conversation == (2, 3)
