"""encode_conversation with the shipped tiny tokenizer: loss masks, image slots, prompts, errors."""

from __future__ import annotations

import pytest

from llava_core.data.prompts import (
    PROMPT_STYLES,
    SYSTEM_PROMPTS,
    PromptError,
    encode_conversation,
)
from llava_core.data.tokenizer import load_tokenizer
from llava_core.presets import TINY_TOKENIZER
from tests.helpers_unit import conv, loss_runs

P = 16  # image slots used throughout


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TINY_TOKENIZER))


def ids_of(tok, text):
    return tok.encode(text, add_special_tokens=False)


def dec(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


THREE_TURNS = conv(
    "What color is the circle?",
    "red",
    "How many shapes are there in the image?",
    "3",
    "Describe the image briefly.",
    "A red circle at the top left, a blue square at the bottom right.",
)


@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_single_turn_loss_tokens_decode_to_answer_plus_eos(tok, style):
    c = conv("Describe the image briefly.", "A green triangle at the top right.")
    enc = encode_conversation(c, tok, style, P, tok.pad_token_id)
    assert len(enc.input_ids) == len(enc.loss_mask)
    assert enc.answer_spans == loss_runs(enc.loss_mask)
    assert len(enc.answer_spans) == 1
    s, e = enc.answer_spans[0]
    assert dec(tok, enc.input_ids[s:e]) == "A green triangle at the top right.</s>"
    assert enc.input_ids[e - 1] == tok.eos_token_id
    masked = [t for t, m in zip(enc.input_ids, enc.loss_mask, strict=True) if m]
    assert dec(tok, masked) == "A green triangle at the top right.</s>"
    assert enc.input_ids[0] == tok.bos_token_id
    assert enc.loss_mask[0] == 0
    assert enc.num_patches == P


@pytest.mark.parametrize("style", ["vicuna_v1", "llava_v1"])
def test_multi_turn_every_answer_supervised(tok, style):
    enc = encode_conversation(THREE_TURNS, tok, style, P, tok.pad_token_id)
    answers = [t["value"] for t in THREE_TURNS[1::2]]
    assert len(enc.answer_spans) == 3
    assert enc.answer_spans == loss_runs(enc.loss_mask)
    for (s, e), answer in zip(enc.answer_spans, answers, strict=True):
        assert dec(tok, enc.input_ids[s:e]) == answer + "</s>"
    # nothing else is supervised: the loss tokens are exactly the three spans
    assert sum(enc.loss_mask) == sum(e - s for s, e in enc.answer_spans)
    # later turns are introduced with "USER: <q> ASSISTANT:" (no loss)
    s1, e1 = enc.answer_spans[0]
    s2, _ = enc.answer_spans[1]
    assert dec(tok, enc.input_ids[e1:s2]) == "USER: How many shapes are there in the image? ASSISTANT:"
    assert enc.input_ids[e1:s2] == ids_of(tok, "USER: How many shapes are there in the image? ASSISTANT:")


def test_plain_multi_turn_uses_first_answer_only(tok):
    enc = encode_conversation(THREE_TURNS, tok, "plain", P, tok.pad_token_id)
    assert enc.image_start == 1
    assert len(enc.answer_spans) == 1
    s, e = enc.answer_spans[0]
    assert dec(tok, enc.input_ids[s:e]) == "red</s>"
    # plain: [BOS] [pad]*P caption [EOS], question text dropped
    assert enc.input_ids == [tok.bos_token_id] + [tok.pad_token_id] * P + ids_of(tok, "red") + [tok.eos_token_id]
    assert enc.loss_mask == [0] * (1 + P) + [1] * (len(ids_of(tok, "red")) + 1)


def test_answers_are_stripped(tok):
    c = conv("q?", "  yes \n")
    enc = encode_conversation(c, tok, "vicuna_v1", P, tok.pad_token_id)
    s, e = enc.answer_spans[0]
    assert dec(tok, enc.input_ids[s:e]) == "yes</s>"


@pytest.mark.parametrize("style", PROMPT_STYLES)
@pytest.mark.parametrize("with_image", [True, False])
def test_image_slots_present_with_or_without_image(tok, style, with_image):
    pad = tok.pad_token_id
    c = conv("Which shape has no corners?", "circle", image=with_image)
    enc = encode_conversation(c, tok, style, P, pad)
    st = enc.image_start
    assert enc.input_ids[st : st + P] == [pad] * P
    assert enc.loss_mask[st : st + P] == [0] * P
    # no pad id anywhere else (the slots are the only pads)
    others = enc.input_ids[:st] + enc.input_ids[st + P :]
    assert pad not in others


def test_image_start_plain_is_one(tok):
    enc = encode_conversation(conv("x", "y"), tok, "plain", 7, tok.pad_token_id)
    assert enc.image_start == 1
    assert enc.input_ids[:8] == [tok.bos_token_id] + [tok.pad_token_id] * 7


@pytest.mark.parametrize("style", ["vicuna_v1", "llava_v1"])
def test_image_start_after_system_and_user(tok, style):
    expected = 1 + len(ids_of(tok, SYSTEM_PROMPTS[style] + " USER: "))
    for c in (conv("What color is the circle?", "red"), THREE_TURNS, conv("Which shape?", "circle", image=False)):
        enc = encode_conversation(c, tok, style, P, tok.pad_token_id)
        assert enc.image_start == expected
    # one fixed index whatever the conversation (the model needs one): BOS + the system prompt's words + USER:
    # + the lone `▁` of the space before the image (LLaVA tokenises the text before the image by itself)
    assert expected == 1 + len(SYSTEM_PROMPTS[style].split()) + 1 + 1 == 26


@pytest.mark.parametrize("style", ["vicuna_v1", "llava_v1"])
def test_prefix_decodes_to_system_prompt(tok, style):
    enc = encode_conversation(conv("What color is the circle?", "red"), tok, style, P, tok.pad_token_id)
    prefix = dec(tok, enc.input_ids[: enc.image_start])
    assert prefix == "<s> " + SYSTEM_PROMPTS[style] + " USER: "
    assert tok.convert_ids_to_tokens(enc.input_ids[enc.image_start - 1]) == "▁"
    after = enc.input_ids[enc.image_start + P : enc.answer_spans[0][0]]
    # the image placeholder is cut out of `<image>\nWhat ...`: its newline stays, `▁` `<0x0A>` (a new piece)
    assert tok.convert_ids_to_tokens(after[:2]) == ["▁", "<0x0A>"]
    assert dec(tok, after) == "\nWhat color is the circle? ASSISTANT:"  # (the decoder strips a leading space)
    assert "<image>" not in dec(tok, enc.input_ids)


def test_system_prompts_are_the_reference_text():
    assert SYSTEM_PROMPTS["vicuna_v1"] == (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    assert SYSTEM_PROMPTS["llava_v1"] == (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )


@pytest.mark.parametrize("style", ["vicuna_v1", "llava_v1"])
def test_for_generation_ends_with_assistant(tok, style):
    assistant = ids_of(tok, "ASSISTANT:")
    # a single question
    enc = encode_conversation(
        [{"from": "human", "value": "<image>\nWhat color is the circle?"}],
        tok,
        style,
        P,
        tok.pad_token_id,
        for_generation=True,
    )
    assert enc.input_ids[-len(assistant) :] == assistant
    assert sum(enc.loss_mask) == 0
    assert enc.answer_spans == []
    assert enc.input_ids[-1] != tok.eos_token_id
    assert dec(tok, enc.input_ids).endswith("What color is the circle? ASSISTANT:")
    # the generation prompt is a prefix of the training sequence of the same question + answer
    train = encode_conversation(conv("What color is the circle?", "red"), tok, style, P, tok.pad_token_id)
    assert train.input_ids[: len(enc.input_ids)] == enc.input_ids
    assert train.image_start == enc.image_start
    # a follow-up question after an answered turn
    follow = THREE_TURNS[:4] + [{"from": "human", "value": "Where is the circle?"}]
    enc2 = encode_conversation(follow, tok, style, P, tok.pad_token_id, for_generation=True)
    assert enc2.input_ids[-len(assistant) :] == assistant
    # the answered turns keep their spans; nothing after the last answer (the new question) is supervised
    assert len(enc2.answer_spans) == 2
    assert sum(enc2.loss_mask[enc2.answer_spans[-1][1] :]) == 0
    assert dec(tok, enc2.input_ids).endswith("3</s> USER: Where is the circle? ASSISTANT:")


def test_for_generation_rejects_final_answer(tok):
    with pytest.raises(PromptError) as ei:
        encode_conversation(conv("q?", "a"), tok, "vicuna_v1", P, tok.pad_token_id, for_generation=True)
    assert ei.value.reason == "generation_prompt_ends_with_answer"


@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_odd_number_of_turns(tok, style):
    with pytest.raises(PromptError) as ei:
        encode_conversation(THREE_TURNS[:3], tok, style, P, tok.pad_token_id)
    assert ei.value.reason == "odd_number_of_turns"
    assert str(ei.value) == "odd_number_of_turns: 3 turns"


@pytest.mark.parametrize(
    "turns",
    [
        [{"from": "human", "value": "<image>\nq"}, {"from": "human", "value": "again"}],
        [{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>\nq"}],
        [
            {"from": "human", "value": "<image>\nq"},
            {"from": "gpt", "value": "a"},
            {"from": "gpt", "value": "b"},
            {"from": "human", "value": "c"},
        ],
    ],
)
def test_turns_not_alternating(tok, turns):
    with pytest.raises(PromptError) as ei:
        encode_conversation(turns, tok, "vicuna_v1", P, tok.pad_token_id)
    assert ei.value.reason == "turns_not_alternating"


@pytest.mark.parametrize("style", PROMPT_STYLES)
@pytest.mark.parametrize("answer", ["", "   ", "\n"])
def test_empty_answer(tok, style, answer):
    with pytest.raises(PromptError) as ei:
        encode_conversation(conv("q?", answer), tok, style, P, tok.pad_token_id)
    assert ei.value.reason == "empty_answer"


def test_empty_answer_in_later_turn(tok):
    c = conv("q?", "a", "q2?", " ")
    with pytest.raises(PromptError) as ei:
        encode_conversation(c, tok, "vicuna_v1", P, tok.pad_token_id)
    assert ei.value.reason == "empty_answer"
    assert "turn 3" in str(ei.value)


def test_empty_conversation(tok):
    with pytest.raises(PromptError) as ei:
        encode_conversation([], tok, "vicuna_v1", P, tok.pad_token_id)
    assert ei.value.reason == "empty_conversation"


def test_unknown_style_names_valid_styles(tok):
    with pytest.raises(ValueError) as ei:
        encode_conversation(conv("q?", "a"), tok, "chatml", P, tok.pad_token_id)
    assert not isinstance(ei.value, PromptError)
    msg = str(ei.value)
    assert "'chatml'" in msg
    for style in PROMPT_STYLES:
        assert style in msg
