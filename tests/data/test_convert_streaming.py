"""The conversion in bounded memory: the JSON array read one element at a time gives what `json.load` gives, at
every cut of the text, with the same errors; ids remembered as digests find every duplicate."""

from __future__ import annotations

import json
import random

import pytest

from llava_core.data import converters
from llava_core.data.convert import SeenIds
from llava_core.data.converters import json_array_items

DOCUMENTS = [
    "[]",
    " \n[ ]\n",
    '[{"id": 1}]',
    '\ufeff[{"id": "bom"}, {"id": 2}]',
    '[1, 22, 333, -4.5e10, true, null, "s", [1, [2]], {"a": {"b": [3]}}]',
    '[{"id": "é", "v": "\\u00e9 \\ud83d\\ude00 \\"q\\" , ]"}, {"x": "]"}]',
    "[\n" + ",\n".join(json.dumps({"id": k, "conversations": [{"value": "w " * k}]}) for k in range(60)) + "\n]\n",
]


@pytest.mark.parametrize("read_chars", [1, 2, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("doc", range(len(DOCUMENTS)))
def test_items_equal_json_load_at_every_cut(tmp_path, monkeypatch, doc, read_chars):
    monkeypatch.setattr(converters, "READ_CHARS", read_chars)
    path = tmp_path / "a.json"
    path.write_text(DOCUMENTS[doc], encoding="utf-8")
    assert list(json_array_items(path)) == json.loads(path.read_text(encoding="utf-8-sig"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "not valid JSON"),
        ('[{"id": 1}, ', "not valid JSON"),
        ('[{"id": 1}', "not valid JSON"),
        ('[{"id": 1},]', "not valid JSON"),
        ('[{"id": 1} {"id": 2}]', "not valid JSON (expected ',' or ']' after element 1)"),
        ('[{"id": 1}] x', "not valid JSON (extra data after the array)"),
        ('[{"id": 1], ', "not valid JSON"),
        ('{"id": 1}', "expected a JSON array of records, got dict"),
        ('"text"', "expected a JSON array of records, got str"),
    ],
)
@pytest.mark.parametrize("read_chars", [3, 1 << 20])
def test_errors_name_the_file(tmp_path, monkeypatch, text, message, read_chars):
    monkeypatch.setattr(converters, "READ_CHARS", read_chars)
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        list(json_array_items(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_not_utf8_deep_in_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(converters, "READ_CHARS", 16)
    path = tmp_path / "bad.json"
    path.write_bytes(b'[{"id": 1}, {"id": 2}, {"id": "\xff"}]')
    with pytest.raises(ValueError, match=f"{path}: not UTF-8 text"):
        list(json_array_items(path))


def test_seen_ids_find_every_duplicate_across_merges():
    rng = random.Random(0)
    ids = [f"id{rng.randrange(3000)}" for _ in range(10000)] + ["", "é", "000000033471", "33471"]
    seen, reference = SeenIds(merge_every=3), set()
    for i in ids:
        assert seen.add(i) == (i not in reference), i
        reference.add(i)
    assert len(seen) == len(reference)
    for high, low in zip(seen.high, seen.low, strict=True):  # each bucket sorted by (high, low)
        pairs = list(zip(high.tolist(), low.tolist(), strict=True))
        assert pairs == sorted(pairs)
