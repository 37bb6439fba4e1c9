"""The encoder against an independent implementation of LLaVA's preprocessing (tests/helpers_llava_reference.py).

For every prompt style and tokenizer family (the shipped tiny tokenizer, Llama-2/Vicuna with `legacy: true`, a
Vicuna-v1.5 vocabulary, Mistral with `legacy: false`): whole token sequences and loss masks of training
conversations (single and multi-turn, image first or last, text-only) and the evaluation prompts equal LLaVA's.
The HDF5 rows are compared the same way in test_hdf5_tokenizers.py.
"""

from __future__ import annotations

import pytest

from llava_core.data.prompts import PROMPT_STYLES, encode_conversation
from llava_core.data.tokenizer import load_tokenizer
from llava_core.evaluation.evaluate import generation_ids
from llava_core.presets import TINY_TOKENIZER
from tests.helpers_llava_reference import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    expand_image,
    llava_generation_prompt,
    llava_sequence,
)
from tests.helpers_tokenizers import build_tokenizer_folder

P = 5  # image slots
FAMILIES = ("tiny", "llama", "vicuna", "mistral", "llama_pad")


def turns(*values: str) -> list[dict]:
    return [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(values)]


CONVERSATIONS = {
    "single": turns("<image>\nWhat color is the circle?", "red"),
    "multi_turn": turns(
        "<image>\nWhat color is the circle?",
        "A red circle.",
        "How many shapes are there?",
        "3",
        "Describe the image briefly.",
        "A red circle at the top left, a blue square at the bottom right.",
    ),
    "image_last": turns("What is in the picture?\n<image>", "A blue square."),
    "suffix_on_its_own_line": turns(
        "<image>\nWhat color is the square?\nAnswer the question using a single word or phrase.", "Blue"
    ),
    "unicode_and_spacing": turns("<image>\nSpell it out.", "Red  and\tblue,\nthen grün: 3.5%"),
    "text_only": turns("How many sides does a square have?", "4", "And a triangle?", "A triangle has 3 sides."),
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout_tokenizers")
    out = {"tiny": load_tokenizer(str(TINY_TOKENIZER))}
    for kind in FAMILIES[1:]:
        out[kind] = load_tokenizer(str(build_tokenizer_folder(root / kind, kind)))
    return out


def legacy(kind: str) -> bool:
    return kind != "mistral"


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("style", PROMPT_STYLES)
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_training_sequence_and_mask_are_llavas(tokenizers, kind, style, name):
    tok = tokenizers[kind]
    conv = CONVERSATIONS[name]
    if style == "plain" and name == "text_only":
        pytest.skip("LLaVA's plain style requires an image (preprocess_plain asserts it)")
    enc = encode_conversation(conv, tok, style, P, tok.pad_token_id)
    ids, targets = llava_sequence(conv, tok, style, legacy(kind))
    assert any(t != IGNORE_INDEX for t in targets), "LLaVA's own arithmetic found a tokenization mismatch"
    if style == "plain":  # Cerebras' phase-1 rows: the caption ends with </s> where LLaVA's plain ends with "\n"
        assert tok.convert_ids_to_tokens(ids[-1]) == "<0x0A>"
        ids, targets = ids[:-1] + [tok.eos_token_id], targets[:-1] + [tok.eos_token_id]
    ids, targets = expand_image(ids, targets, P, tok.pad_token_id, enc.image_start)
    assert enc.input_ids == ids
    assert enc.loss_mask == [int(t != IGNORE_INDEX) for t in targets]
    if IMAGE_TOKEN_INDEX not in llava_sequence(conv, tok, style, legacy(kind))[0]:  # text-only: slots masked later
        assert enc.image_start == encode_conversation(CONVERSATIONS["single"], tok, style, P, 0).image_start


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("style", ["vicuna_v1", "llava_v1"])
@pytest.mark.parametrize(
    "question", ["What color is the circle?", "Is there a square?\nAnswer the question using a single word or phrase."]
)
def test_evaluation_prompt_is_llavas(tokenizers, kind, style, question):
    tok = tokenizers[kind]
    image_token = 99
    ours = generation_ids(question, tok, style, P, tok.pad_token_id, image_token)
    llava = llava_generation_prompt(question, tok, style)
    at = llava.index(IMAGE_TOKEN_INDEX)
    assert ours == llava[:at] + [image_token] * P + llava[at + 1 :]
    assert tok.decode(ours[at + P :]).endswith(" ASSISTANT:")
    # the prompt is the start of the training sequence of the same question with an answer
    train = encode_conversation(turns(f"<image>\n{question}", "yes"), tok, style, P, tok.pad_token_id)
    assert train.input_ids[: len(ours)][at + P :] == ours[at + P :]


def test_first_turn_layout_keeps_llavas_space_tokens(tokenizers):
    """`... USER: <image>\\nWhat ...`: a lone `▁` before the image and `▁`, `<0x0A>` after it (Llama-2 style)."""
    tok = tokenizers["vicuna"]
    enc = encode_conversation(CONVERSATIONS["single"], tok, "vicuna_v1", P, tok.pad_token_id)
    s = enc.image_start
    assert s == 35
    pieces = tok.convert_ids_to_tokens(enc.input_ids)
    assert pieces[s - 4 : s] == ["▁US", "ER", ":", "▁"]
    assert pieces[s + P : s + P + 3] == ["▁", "<0x0A>", "W"]
    answer = pieces[enc.answer_spans[0][0] : enc.answer_spans[0][1]]
    assert pieces[enc.answer_spans[0][0] - 5 : enc.answer_spans[0][0]] == ["▁A", "SS", "IST", "ANT", ":"]
    assert answer == ["▁red", "</s>"]


def test_mistral_later_turns_have_no_extra_space(tokenizers):
    """A non-legacy tokenizer writes `</s>USER:` without a `▁` between (the text after a special token is not
    the start of a text); the legacy one writes `</s>▁USER:`, as LLaVA's tokenisation of the whole piece does."""
    conv = CONVERSATIONS["multi_turn"]
    for kind, expected in (("mistral", ["</s>", "USER"]), ("llama", ["</s>", "▁", "USER"])):
        tok = tokenizers[kind]
        enc = encode_conversation(conv, tok, "vicuna_v1", P, tok.pad_token_id)
        pieces = tok.convert_ids_to_tokens(enc.input_ids)
        end = enc.answer_spans[0][1]
        assert pieces[end - 1 : end - 1 + len(expected)] == expected, kind


@pytest.mark.parametrize("kind", FAMILIES)
def test_batched_encoder_equals_single(tokenizers, kind):
    """The writer's path (one batched call for many conversations) gives the ids of the one-by-one path."""
    from llava_core.data.prompts import OffsetEncoding, batch_encoder, conversation_segments, encode_segments_batch

    tok = tokenizers[kind]
    convs = list(CONVERSATIONS.values())
    segments = [conversation_segments(c, "vicuna_v1", eos_text=tok.eos_token) for c in convs]
    batch = encode_segments_batch(segments, batch_encoder(tok), tok.bos_token_id, tok.eos_token_id, P, tok.pad_token_id)
    # a tokenizer without a Rust pipeline gives ids and offsets (OffsetEncoding): the same conversations
    backend = tok.backend_tokenizer

    def offsets_only(texts):
        return [OffsetEncoding(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]

    by_offsets = encode_segments_batch(segments, offsets_only, tok.bos_token_id, tok.eos_token_id, P, tok.pad_token_id)
    for conv, enc, other in zip(convs, batch, by_offsets, strict=True):
        single = encode_conversation(conv, tok, "vicuna_v1", P, tok.pad_token_id)
        for got in (enc, other):
            assert (got.input_ids, got.loss_mask, got.image_start) == (
                single.input_ids,
                single.loss_mask,
                single.image_start,
            )


def test_reference_sees_llavas_mismatch_bug(tokenizers):
    """The reference's target rule is LLaVA's own: lengths counted per round; a tokenizer whose later rounds do not
    lose exactly one token (here: told `legacy: false` while it is legacy) makes LLaVA ignore the whole
    conversation, where the encoder's masks, from token positions, are unaffected."""
    tok = tokenizers["llama"]
    _, targets = llava_sequence(CONVERSATIONS["multi_turn"], tok, "vicuna_v1", legacy=False)
    assert set(targets) == {IGNORE_INDEX}
    enc = encode_conversation(CONVERSATIONS["multi_turn"], tok, "vicuna_v1", P, tok.pad_token_id)
    assert len(enc.answer_spans) == 3
