"""The writer with the tiny, Llama-2, Vicuna-v1.5-style and Mistral tokenizers, every prompt style.

For each tokenizer and style: every written row equals, whole, the row built from an independent implementation
of LLaVA's preprocessing (tests/helpers_llava_reference.py: LLaVA's sequence and targets, in Cerebras' row
construction), multi-turn and text-only records included; the supervised labels decode to exactly each
record's answers (each ending in `</s>`); and the image start is the one LLaVA's layout gives (35 for a
Vicuna-v1.5 tokenizer in phase 2, 1 in phase 1).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from llava_core.data.hdf5_writer import build_hdf5
from llava_core.data.prompts import PROMPT_STYLES, SYSTEM_PROMPTS
from llava_core.data.tokenizer import load_tokenizer
from llava_core.params import load_config
from llava_core.presets import TINY_TOKENIZER
from tests.helpers_hdf5 import (
    TEXT_ONLY_EXTRA,
    answers_of,
    jsonl_records,
    read_phase,
    small_workspace,
    supervised_answers,
)
from tests.helpers_llava_reference import IMAGE, cerebras_row, expand_image, llava_sequence
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
    folders["tiny"] = TINY_TOKENIZER
    return root, cfg, folders


def llava_row(rec: dict, tok, style: str, kind: str, msl: int, image_start: int, num_patches: int) -> np.ndarray:
    """The row of `rec` from the reference: LLaVA's tokens and targets, Cerebras' construction."""
    conv = rec["conversations"]
    has_image = "image" in rec
    if style == "plain" and not has_image:  # LLaVA's plain needs an image: the row is the image layout, masked
        conv = [{"from": "human", "value": IMAGE}, *conv[1:]]
    ids, targets = llava_sequence(conv, tok, style, legacy=kind != "mistral")
    if style == "plain":  # phase-1 rows end on </s> (Cerebras), LLaVA's plain on "\n"
        assert tok.convert_ids_to_tokens(ids[-1]) == "<0x0A>"
        ids, targets = ids[:-1] + [tok.eos_token_id], targets[:-1] + [tok.eos_token_id]
    ids, targets = expand_image(ids, targets, num_patches, tok.pad_token_id, image_start)
    return cerebras_row(ids, targets, msl, tok.pad_token_id, has_image, image_start, num_patches)


@pytest.mark.parametrize("kind", ["tiny", *KINDS])
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
    else:  # BOS + the system prompt, "USER:" and the space before the image, as this tokenizer encodes them
        assert start == 1 + len(tok.encode(f"{SYSTEM_PROMPTS[style]} USER: ", add_special_tokens=False))

    num_patches = data_params["image_patch_info"]["num_patches"]
    expected = Counter(
        llava_row(r, tok, style, kind, 640, start, num_patches).tobytes() + r.get("image", "None").encode()
        for r in records
    )
    assert Counter(row.tobytes() + path.encode() for row, path in zip(data, paths, strict=True)) == expected

    by_image = {r["image"]: r for r in records if "image" in r}
    text_only = Counter(tuple(answers_of(r, style)) for r in records if "image" not in r)
    seen = Counter()
    for row, path in zip(data, paths, strict=True):
        got = supervised_answers(row, tok)
        if path == "None":
            seen[got] += 1
            continue
        assert got == tuple(answers_of(by_image[path], style)), path
    assert seen == text_only
    assert ("Red  and\tblue,\nthen grün: 3.5%",) in seen
    assert ("4", "A triangle has 3 sides.") in seen or style == "plain"


def test_vicuna_image_start_is_35_in_phase2_and_1_in_phase1(workspace):
    """REFERENCE section 6: BOS + the system prompt (30 tokens) + `▁US` `ER` `:` + the lone `▁` before the image."""
    root, _, folders = workspace
    params = base_params(root)
    params["model"]["tokenizer"] = str(folders["vicuna"])
    params["workspace"]["hdf5"] = "hdf5_vicuna_default_styles"
    cfg = load_config(write_params(root / "cfg_vicuna_default", params))
    assert (cfg.hdf5["phase1"].prompt_style, cfg.hdf5["phase2"].prompt_style) == ("plain", "vicuna_v1")
    assert build_hdf5(cfg, "phase2").image_start_idx == 35
    assert build_hdf5(cfg, "phase1").image_start_idx == 1
    for phase, start in (("phase1", 1), ("phase2", 35)):
        data_params, data, _ = read_phase(cfg.hdf5_dir(phase))
        assert data_params["image_patch_info"]["image_patch_start_idx"] == start
        tok = load_tokenizer(str(folders["vicuna"]))
        before = tok.convert_ids_to_tokens(data[0, 0, :start].tolist())
        assert before[0] == "<s>" and (phase == "phase1" or before[-4:] == ["▁US", "ER", ":", "▁"])
