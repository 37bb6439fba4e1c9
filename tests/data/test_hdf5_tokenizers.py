"""The writer with Llama-2/Vicuna and Mistral tokenizer folders (built locally), every prompt style.

For each folder and style: the supervised labels decode to exactly each record's answers (each ending in
`</s>`), multi-turn and text-only records included, and the writer's batched tokenisation gives the ids that
`encode_conversation` (what evaluation uses, through transformers) gives for the same record.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from llava_core.data.hdf5_writer import build_hdf5
from llava_core.data.prompts import PROMPT_STYLES, SYSTEM_PROMPTS, encode_conversation
from llava_core.data.tokenizer import load_tokenizer
from llava_core.params import load_config
from tests.helpers_hdf5 import (
    TEXT_ONLY_EXTRA,
    answers_of,
    jsonl_records,
    read_phase,
    small_workspace,
    supervised_answers,
)
from tests.helpers_tokenizers import KINDS, build_tokenizer_folder
from tests.helpers_unit import base_params, write_params

UNUSUAL = {  # spacing, a tab, a newline and non-ASCII text survive the round trip
    "id": "unusual",
    "conversations": [
        {"from": "human", "value": "Spell it out."},
        {"from": "gpt", "value": "Red  and\tblue,\nthen grün: 3.5%"},
    ],
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokws")
    cfg = small_workspace(root, extra={"shapes_instruct": [TEXT_ONLY_EXTRA, UNUSUAL]})
    folders = {k: build_tokenizer_folder(root / "tokenizers" / k, k) for k in KINDS}
    return root, cfg, folders


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_written_examples_decode_to_the_answers(workspace, kind, style):
    root, base, folders = workspace
    params = base_params(root)
    params["model"]["tokenizer"] = str(folders[kind])
    params["hdf5"]["phase2"].update(prompt_style=style, max_sequence_length=640, shard_size=7)
    params["workspace"]["hdf5"] = f"hdf5_{kind}_{style}"
    cfg = load_config(write_params(root / f"cfg_{kind}_{style}", params))
    result = build_hdf5(cfg, "phase2")
    tok = load_tokenizer(str(folders[kind]))
    data_params, data, paths = read_phase(cfg.hdf5_dir("phase2"))
    assert (data_params["vocab_size"], data_params["pad_id"]) == (len(tok), tok.pad_token_id)
    assert data_params["eos_id"] == tok.eos_token_id == 2 and data_params["bos_id"] == tok.bos_token_id == 1
    if kind == "llama_pad":
        assert tok.pad_token_id == len(tok) - 1 != tok.unk_token_id
    else:
        assert tok.pad_token_id == tok.unk_token_id == 0  # Llama/Mistral folders have no pad: unk pads
    records = jsonl_records(data_params, cfg.root)
    assert result.examples == len(records) == 22 and result.discarded == {}

    start = data_params["image_patch_info"]["image_patch_start_idx"]
    if style == "plain":
        assert start == 1
    else:  # BOS + the system prompt and "USER:" as this tokenizer encodes them
        assert start == 1 + len(tok.encode(f"{SYSTEM_PROMPTS[style]} USER:", add_special_tokens=False))

    by_image = {r["image"]: r for r in records if "image" in r}
    text_only = Counter(tuple(answers_of(r, style)) for r in records if "image" not in r)
    seen = Counter()
    num_patches = data_params["image_patch_info"]["num_patches"]
    for row, path in zip(data, paths, strict=True):
        got = supervised_answers(row, tok)
        if path == "None":
            seen[got] += 1
            continue
        rec = by_image[path]
        assert got == tuple(answers_of(rec, style)), path
        enc = encode_conversation(rec["conversations"], tok, style, num_patches, tok.pad_token_id)
        n = len(enc.input_ids)
        np.testing.assert_array_equal(row[0, :n], enc.input_ids)
        assert (row[0, n:] == tok.pad_token_id).all()
    assert seen == text_only
    assert ("Red  and\tblue,\nthen grün: 3.5%",) in seen
    assert ("4", "A triangle has 3 sides.") in seen or style == "plain"
