"""Prompt styles and the one function that turns a conversation into token ids, loss mask and image slots.

The HDF5 writer (training) and evaluation (generation prompts) both call `encode_conversation`, so the
tokens a model is trained on and the tokens it is asked with are built the same way. Loss masks are built
per turn from token positions, never by re-tokenising and subtracting lengths (the arithmetic that
silently zeroes LLaVA's loss when a tokenizer differs).
"""

from __future__ import annotations

from collections.abc import Callable
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
# The evaluation prompt suffixes (docs/formats.md), by the names `eval.suffixes` and questions use.
PROMPT_SUFFIXES: dict[str, str] = {
    "short_answer": "Answer the question using a single word or phrase.",
    "multiple_choice": "Answer with the option's letter from the given choices directly.",
    "none": "",
}


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


# A conversation as segments before tokenisation: text to tokenise, or fixed ids (BOS, EOS, image slots).
# Both the single and the batched encoder assemble the same segments, so they give the same ids.
TEXT, BOS, EOS, IMAGE = "text", "bos", "eos", "image"


@dataclass
class Segments:
    """(kind, text, supervised) in order; `texts()` are the strings to tokenise, in order."""

    parts: list[tuple[str, str, bool]] = field(default_factory=list)
    num_answers: int = 0

    def add(self, kind: str, text: str = "", loss: bool = False) -> None:
        self.parts.append((kind, text, loss))

    def texts(self) -> list[str]:
        return [t for kind, t, _ in self.parts if kind == TEXT]


def conversation_segments(conversations: list[dict], style: str, for_generation: bool = False) -> Segments:
    """The layout of one LLaVA conversation in `style` (see `encode_conversation`), before tokenisation."""
    check_style(style)
    pairs = _split_turns(conversations)
    if for_generation:
        if pairs[-1][1] is not None:
            raise PromptError("generation_prompt_ends_with_answer")
    elif pairs[-1][1] is None:
        raise PromptError("odd_number_of_turns", f"{len(conversations)} turns")

    seg = Segments()
    if style == "plain":
        q, a = pairs[0]
        seg.add(BOS)
        seg.add(IMAGE)
        if a is not None:
            if not a.strip():
                raise PromptError("empty_answer")
            seg.add(TEXT, a.strip(), loss=True)
            seg.add(EOS, loss=True)
            seg.num_answers = 1
        return seg

    system = SYSTEM_PROMPTS[style]
    for k, (q, a) in enumerate(pairs):
        question = _strip_image(q)
        if k == 0:
            seg.add(BOS)
            seg.add(TEXT, f"{system} USER:")
            seg.add(IMAGE)
            seg.add(TEXT, f"{question} ASSISTANT:")
        else:
            seg.add(TEXT, f"USER: {question} ASSISTANT:")
        if a is None:
            break
        if not a.strip():
            raise PromptError("empty_answer", f"turn {2 * k + 1}")
        seg.add(TEXT, a.strip(), loss=True)
        seg.add(EOS, loss=True)
        seg.num_answers += 1
    return seg


def assemble(
    seg: Segments, token_ids: list[list[int]], bos: int, eos: int, num_patches: int, pad_id: int
) -> EncodedConversation:
    """Join the segments with `token_ids` (one list per text segment, in order) into ids + loss mask.

    The HDF5 writer's inner loop (a dozen parts per conversation, every record): plain list operations.
    """
    ids_out: list[int] = []
    mask: list[int] = []
    spans: list[tuple[int, int]] = []
    image_start = 0
    texts = iter(token_ids)
    span_start: int | None = None
    for kind, _text, loss in seg.parts:
        if kind == TEXT:
            ids = next(texts)
        elif kind == BOS:
            ids = [bos]
        elif kind == EOS:
            ids = [eos]
        else:
            image_start = len(ids_out)
            ids = [pad_id] * num_patches
        if loss and span_start is None:
            span_start = len(ids_out)
        ids_out += ids
        mask += [1 if loss else 0] * len(ids)
        if kind == EOS and span_start is not None:  # an answer ends with its </s>
            spans.append((span_start, len(ids_out)))
            span_start = None
    return EncodedConversation(ids_out, mask, image_start, num_patches, spans)


def _special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("tokenizer must define bos_token_id and eos_token_id")
    return bos, eos


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
    Each text segment is tokenised on its own (no special tokens), so masks follow token positions.
    """
    seg = conversation_segments(conversations, style, for_generation)
    bos, eos = _special_ids(tokenizer)
    ids = [tokenizer.encode(t, add_special_tokens=False) if t else [] for t in seg.texts()]
    return assemble(seg, ids, bos, eos, num_patches, pad_id)


def encode_segments_batch(
    segments: list[Segments],
    encode_batch: Callable[[list[str]], list[list[int]]],
    bos: int,
    eos: int,
    num_patches: int,
    pad_id: int,
) -> list[EncodedConversation]:
    """`encode_conversation` for many conversations with one batched tokeniser call (the HDF5 writer's path).

    `encode_batch(texts)` must return the ids `tokenizer.encode(text, add_special_tokens=False)` would.
    """
    texts = [t for seg in segments for t in seg.texts()]
    unique = list(dict.fromkeys(t for t in texts if t))  # system prompts and common questions: once each
    known = dict(zip(unique, encode_batch(unique) if unique else [], strict=True))
    ids = [known[t] if t else [] for t in texts]
    out, k = [], 0
    for seg in segments:
        n = len(seg.texts())
        out.append(assemble(seg, ids[k : k + n], bos, eos, num_patches, pad_id))
        k += n
    return out


# --- evaluation suffixes in questions (docs/evaluation.md#evaluation-suffixes) ---------------------------
def with_suffix(text: str, suffix: str) -> str:
    """The question followed by the suffix on its own line (as LLaVA's eval files and its mix665k VQA turns are
    written), once."""
    if not suffix or text.rstrip().endswith(suffix):
        return text
    return f"{text}\n{suffix}"


def suffix_name(text: str) -> str:
    """The `PROMPT_SUFFIXES` name a question ends with, the `<image>` placeholder aside; "none" for none of them."""
    body = _strip_image(text)
    return next((name for name, s in PROMPT_SUFFIXES.items() if s and body.endswith(s)), "none")


def count_image_placeholders(conversations: list[dict]) -> int:
    """`<image>` occurrences in the turns' text values (a malformed turn counts none; the encoder rejects it)."""
    return sum(
        t["value"].count(IMAGE_PLACEHOLDER)
        for t in conversations
        if isinstance(t, dict) and isinstance(t.get("value"), str)
    )


def placeholder_problem(conversations: list[dict], has_image: bool) -> str | None:
    """The counted rejection reason when the `<image>` placeholders do not fit the record, else None.

    docs/formats.md (the jsonl record): `<image>` appears exactly once, in the first human turn, when the record has an
    image, and never in a text-only record (the encoder would otherwise move or drop it silently).
    """
    n = count_image_placeholders(conversations)
    if not has_image:
        return "image_placeholder_without_image" if n else None
    first = conversations[0] if conversations else None
    in_first = isinstance(first, dict) and isinstance(first.get("value"), str) and IMAGE_PLACEHOLDER in first["value"]
    return None if n == 1 and in_first else "image_placeholder_count"


def text_is_valid_unicode(value: object) -> bool:
    """False when a string anywhere in `value` (a parsed JSON record) holds a lone surrogate: JSON's `\\ud800`
    escapes parse, but the text cannot be written as UTF-8 nor tokenised."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(text_is_valid_unicode(k) and text_is_valid_unicode(v) for k, v in value.items())
    if isinstance(value, list):
        return all(text_is_valid_unicode(v) for v in value)
    return True
