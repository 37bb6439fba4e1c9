"""Prompt styles and the one function that turns a conversation into token ids, loss mask and image slots.

The HDF5 writer (training) and evaluation (generation prompts) both call `encode_conversation`, so the
tokens a model is trained on and the tokens it is asked with are built the same way. Loss masks are built
per turn from token positions, never by re-tokenising and subtracting lengths (the arithmetic that
silently zeroes LLaVA's loss when a tokenizer differs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

IMAGE_PLACEHOLDER = "<image>"

SYSTEM_PROMPTS: dict[str, str] = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    "llava_v1": (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
}
PROMPT_STYLES = ("plain", "vicuna_v1", "llava_v1")


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class PromptError(ValueError):
    """A conversation that cannot be encoded; the message says why (used as a counted rejection reason)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class EncodedConversation:
    """Token ids with a parallel loss mask; the image occupies `num_patches` slots from `image_start`."""

    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    image_start: int = 0
    num_patches: int = 0
    answer_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each answer (+eos)

    def _add(self, ids: list[int], loss: bool) -> tuple[int, int]:
        start = len(self.input_ids)
        self.input_ids.extend(ids)
        self.loss_mask.extend([1 if loss else 0] * len(ids))
        return start, len(self.input_ids)


def check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; valid: {', '.join(PROMPT_STYLES)}")


def _split_turns(conversations: list[dict]) -> list[tuple[str, str | None]]:
    """Validate alternation and return (question, answer) pairs; the last answer may be None (generation)."""
    if not conversations:
        raise PromptError("empty_conversation")
    pairs: list[tuple[str, str | None]] = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise PromptError("malformed_turn", f"turn {k}")
        if not isinstance(turn["value"], str):
            raise PromptError("malformed_turn", f"turn {k} value is not a string")
        expected = "human" if k % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise PromptError("turns_not_alternating", f"turn {k} is from {turn['from']!r}, expected {expected!r}")
        if expected == "human":
            pairs.append((turn["value"], None))
        else:
            pairs[-1] = (pairs[-1][0], turn["value"])
    return pairs


def _strip_image(text: str) -> str:
    """Remove the `<image>` placeholder and the newline that joins it to the question."""
    return (
        text.replace(IMAGE_PLACEHOLDER + "\n", "")
        .replace("\n" + IMAGE_PLACEHOLDER, "")
        .replace(IMAGE_PLACEHOLDER, "")
        .strip()
    )


def encode_conversation(
    conversations: list[dict],
    tokenizer: Tokenizer,
    style: str,
    num_patches: int,
    pad_id: int,
    for_generation: bool = False,
) -> EncodedConversation:
    """Encode one LLaVA conversation.

    plain:      [BOS] [pad]*P caption [EOS]                      (question text dropped; loss on caption+EOS)
    vicuna_v1:  [BOS] SYSTEM USER: [pad]*P q1 ASSISTANT: a1 [EOS] USER: q2 ASSISTANT: a2 [EOS] ...
    Text-only records keep the slots (the caller masks them with key_padding_mask).
    With ``for_generation`` the conversation must end with a human turn and the ids end with `ASSISTANT:`.
    """
    check_style(style)
    pairs = _split_turns(conversations)
    if for_generation:
        if pairs[-1][1] is not None:
            raise PromptError("generation_prompt_ends_with_answer")
    elif pairs[-1][1] is None:
        raise PromptError("odd_number_of_turns", f"{len(conversations)} turns")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("tokenizer must define bos_token_id and eos_token_id")

    def tok(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    enc = EncodedConversation(num_patches=num_patches)
    if style == "plain":
        q, a = pairs[0]
        enc._add([bos], loss=False)
        enc.image_start = len(enc.input_ids)
        enc._add([pad_id] * num_patches, loss=False)
        if a is None:
            return enc
        if not a.strip():
            raise PromptError("empty_answer")
        enc.answer_spans.append(enc._add(tok(a.strip()) + [eos], loss=True))
        return enc

    system = SYSTEM_PROMPTS[style]
    for k, (q, a) in enumerate(pairs):
        question = _strip_image(q)
        if k == 0:
            enc._add([bos] + tok(f"{system} USER:"), loss=False)
            enc.image_start = len(enc.input_ids)
            enc._add([pad_id] * num_patches, loss=False)
            enc._add(tok(f"{question} ASSISTANT:"), loss=False)
        else:
            enc._add(tok(f"USER: {question} ASSISTANT:"), loss=False)
        if a is None:
            break
        if not a.strip():
            raise PromptError("empty_answer", f"turn {2 * k + 1}")
        enc.answer_spans.append(enc._add(tok(a.strip()) + [eos], loss=True))
    return enc


def count_image_placeholders(conversations: list[dict]) -> int:
    return sum(t.get("value", "").count(IMAGE_PLACEHOLDER) for t in conversations if isinstance(t, dict))
