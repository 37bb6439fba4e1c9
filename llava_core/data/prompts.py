"""Prompt styles and the one encoder that turns a conversation into token ids, loss mask and image slots.

The HDF5 writer (training) and evaluation (generation prompts) both go through `encode_segments_batch`, so the
tokens a model is trained on and the tokens it is asked with are built the same way, and that way is LLaVA's
(`tokenizer_image_token`): the conversation is rendered as LLaVA renders it (`</s>` written as text after each
answer), the text is split at the image and each piece is tokenised by itself, BOS on the first piece only.
Loss masks come from token positions (the character offsets the tokenizer reports for each token), never by
re-tokenising and subtracting lengths (the arithmetic that silently zeroes LLaVA's loss when a tokenizer differs).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
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
    eos_token: str | None


# texts -> (ids, character offsets of each token) per text, without special tokens: what the tokenizer's
# Rust pipeline gives (`tokenizers.Tokenizer.encode_batch(texts, add_special_tokens=False)`)
Offsets = Sequence[tuple[int, int]]
EncodeBatch = Callable[[list[str]], list[tuple[list[int], Offsets]]]


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
    """The question without the `<image>` placeholder, stripped (LLaVA's `preprocess_multimodal` then puts the
    image first: `<image>\n{question}`)."""
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


# The parts of a piece: text with no loss, an answer (supervised, with the space that joins it to `ASSISTANT:`),
# and the EOS written as the tokenizer's EOS text (`</s>`, as LLaVA's template writes it; supervised).
TEXT, ANSWER, EOS = "text", "answer", "eos"


@dataclass
class Segments:
    """A conversation as LLaVA renders it, before tokenisation.

    `pieces` are the texts around the image (two with an image, the second starting right after it; one without),
    each a list of (kind, text) parts. `image_prefix` is the text before the image in this style: a text-only
    conversation puts its (masked) image slots where that text ends, so every row shares one image start.
    """

    pieces: list[list[tuple[str, str]]] = field(default_factory=list)
    has_image: bool = True
    image_prefix: str = ""
    num_answers: int = 0

    def render(self, eos_text: str) -> list[tuple[str, list[tuple[int, int]]]]:
        """Each piece's text and the character ranges [start, end) of its supervised parts (answer + EOS)."""
        out = []
        for parts in self.pieces:
            text, ranges = "", []
            for kind, part in parts:
                part = eos_text if kind == EOS else part
                if kind != TEXT:
                    if ranges and ranges[-1][1] == len(text):  # an answer runs on through its EOS
                        ranges[-1] = (ranges[-1][0], len(text) + len(part))
                    else:
                        ranges.append((len(text), len(text) + len(part)))
                text += part
            out.append((text, ranges))
        return out

    def texts(self, eos_text: str = "</s>") -> list[str]:
        """The strings the tokenizer is given (the pieces), in order."""
        return [text for text, _ in self.render(eos_text)]


def _answer(parts: list[tuple[str, str]], answer: str, where: str, sep: str = "") -> None:
    """Append an answer and its EOS. `sep`, the space after `ASSISTANT:`, is supervised with the answer: LLaVA's
    targets start right after `ASSISTANT:`, so a tokenizer that writes that space as a token of its own (a lone
    `▁` before a digit, in Llama's vocabulary) is trained to produce it."""
    if not answer.strip():
        raise PromptError("empty_answer", where)
    parts += [(ANSWER, sep + answer.strip()), (EOS, "")]


def conversation_segments(conversations: list[dict], style: str, for_generation: bool = False) -> Segments:
    """The layout of one LLaVA conversation in `style` (see `encode_conversation`), before tokenisation.

    The conversation has an image when its first question holds the `<image>` placeholder (the writer rejects
    records whose placeholders do not match their image before this matters).
    """
    check_style(style)
    pairs = _split_turns(conversations)
    if for_generation:
        if pairs[-1][1] is not None:
            raise PromptError("generation_prompt_ends_with_answer")
    elif pairs[-1][1] is None:
        raise PromptError("odd_number_of_turns", f"{len(conversations)} turns")
    has_image = IMAGE_PLACEHOLDER in pairs[0][0]
    if style == "plain":  # the image, then the caption and EOS (Cerebras' phase-1 rows; LLaVA ends on "\n")
        rest: list[tuple[str, str]] = []
        if pairs[0][1] is not None:
            _answer(rest, pairs[0][1], "turn 1")
        return Segments([[], rest] if has_image else [rest], has_image, "", 1 if rest else 0)

    prefix = f"{SYSTEM_PROMPTS[style]} USER: "
    first = _strip_image(pairs[0][0])
    if has_image:  # `{SYSTEM} USER: <image>\n{q1} ASSISTANT:` split at the image
        pieces = [[(TEXT, prefix)], [(TEXT, f"\n{first} ASSISTANT:" if first else " ASSISTANT:")]]
    else:
        pieces = [[(TEXT, f"{prefix}{first} ASSISTANT:")]]
    parts = pieces[-1]
    seg = Segments(pieces, has_image, prefix)
    for k, (q, a) in enumerate(pairs):
        if k:
            parts.append((TEXT, f"USER: {_strip_image(q)} ASSISTANT:"))
        if a is None:
            break
        _answer(parts, a, f"turn {2 * k + 1}", sep=" ")
        seg.num_answers += 1
    return seg


def _supervised(offsets: Offsets, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token index ranges [i, j) of the tokens whose characters overlap each supervised character range.

    Offsets are in text order; a token of no width (a prefix `▁` some tokenizers add) counts as one character.
    """
    spans = []
    for r0, r1 in ranges:
        j = bisect_left(offsets, (r1,))  # tokens starting before r1
        i = bisect_left(offsets, (r0,))  # tokens starting at or after r0 ...
        while i > 0 and max(offsets[i - 1][1], offsets[i - 1][0] + 1) > r0:  # ... and the one straddling r0
            i -= 1
        spans.append((i, j))
    return spans


def _assemble(
    seg: Segments,
    rendered: list[tuple[str, list[tuple[int, int]]]],
    encoded: dict[str, tuple[list[int], Offsets]],
    bos: int,
    eos: int,
    num_patches: int,
    pad_id: int,
    image_start: int,
) -> EncodedConversation:
    """BOS, the first piece's tokens, the image slots, the next piece's tokens; loss on the supervised tokens.

    A conversation without an image gets its slots (masked later by key_padding_mask) at `image_start`, the index
    every image row has, so its attended tokens are exactly LLaVA's text-only sequence.
    """
    ids, mask, spans = [bos], [0], []
    for k, (text, ranges) in enumerate(rendered):
        if k == 1:
            image_start = len(ids)
            ids += [pad_id] * num_patches
            mask += [0] * num_patches
        tokens, offsets = encoded[text]
        base = len(ids)
        ids += tokens
        mask += [0] * len(tokens)
        for i, j in _supervised(offsets, ranges):
            if j <= i or tokens[j - 1] != eos:
                raise ValueError(
                    f"the tokenizer does not encode its EOS text as the EOS id {eos} after an answer in {text!r}"
                )
            mask[base + i : base + j] = [1] * (j - i)
            spans.append((base + i, base + j))
    if not seg.has_image:
        if (spans and spans[0][0] < image_start) or len(ids) < image_start:
            raise PromptError("image_slots_inside_answer", f"the slots go at {image_start}")
        ids[image_start:image_start] = [pad_id] * num_patches
        mask[image_start:image_start] = [0] * num_patches
        spans = [(s + num_patches, e + num_patches) for s, e in spans]
    return EncodedConversation(ids, mask, image_start, num_patches, spans)


def encode_segments_batch(
    segments: list[Segments],
    encode_batch: EncodeBatch,
    bos: int,
    eos: int,
    num_patches: int,
    pad_id: int,
    eos_text: str,
) -> list[EncodedConversation]:
    """Encode many conversations with one batched tokeniser call (the HDF5 writer's path; evaluation's too).

    `encode_batch(texts)` returns, for each text, its ids and each token's character offsets, without special
    tokens (`backend_encoder`, `batch_encoder`); `eos_text` is the EOS token's text (`</s>`), written after each
    answer as LLaVA's template writes it. Each distinct text is tokenised once (the first piece, the system
    prompt, is the same in every conversation of a style).
    """
    rendered = [seg.render(eos_text) for seg in segments]
    texts = {seg.image_prefix: None for seg in segments}
    texts.update((text, None) for pieces in rendered for text, _ in pieces)
    unique = [t for t in texts if t]
    encoded: dict[str, tuple[list[int], Offsets]] = {"": ([], [])}
    encoded.update(zip(unique, encode_batch(unique) if unique else [], strict=True))
    starts = {prefix: 1 + len(encoded[prefix][0]) for prefix in {seg.image_prefix for seg in segments}}
    return [
        _assemble(seg, pieces, encoded, bos, eos, num_patches, pad_id, starts[seg.image_prefix])
        for seg, pieces in zip(segments, rendered, strict=True)
    ]


def backend_encoder(backend) -> EncodeBatch:
    """`EncodeBatch` over a `tokenizers.Tokenizer` (a fast tokenizer's Rust pipeline; the writer's workers)."""

    def encode_batch(texts: list[str]) -> list[tuple[list[int], Offsets]]:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]

    return encode_batch


def batch_encoder(tokenizer) -> EncodeBatch:
    """`EncodeBatch` for a transformers tokenizer: its Rust pipeline when it has one, else its own offsets."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend_encoder(backend)

    def encode_batch(texts: list[str]) -> list[tuple[list[int], Offsets]]:
        try:
            out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise ValueError(
                f"{type(tokenizer).__name__} reports no token offsets; the encoder needs a fast tokenizer "
                "(a folder with tokenizer.json)"
            ) from None
        return list(zip(out["input_ids"], out["offset_mapping"], strict=True))

    return encode_batch


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
    """Encode one LLaVA conversation as LLaVA's `tokenizer_image_token` does (P = num_patches pad slots):

    plain:      [BOS] [pad]*P caption [EOS]                      (question text dropped; loss on caption + EOS)
    vicuna_v1:  [BOS] tok("{SYSTEM} USER: ") [pad]*P tok("\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: ...")
    A text-only conversation is LLaVA's text-only sequence, tok("{SYSTEM} USER: {q1} ASSISTANT: ..."), with the
    P slots (masked by the caller with key_padding_mask) at the index where an image row has them.
    With ``for_generation`` the conversation must end with a human turn and the ids end with `ASSISTANT:`.
    """
    seg = conversation_segments(conversations, style, for_generation)
    bos, eos = _special_ids(tokenizer)
    eos_text = tokenizer.eos_token
    if not eos_text:
        raise ValueError("tokenizer must define eos_token (its text is written after each answer)")
    return encode_segments_batch([seg], batch_encoder(tokenizer), bos, eos, num_patches, pad_id, eos_text)[0]


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
