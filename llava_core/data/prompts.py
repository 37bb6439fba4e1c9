"""Prompt styles and the one encoder that turns a conversation into token ids, loss mask and image slots.

The HDF5 writer (training) and evaluation (generation prompts) both go through `encode_segments_batch`, so the
tokens a model is trained on and the tokens it is asked with are built the same way, and that way is LLaVA's
(`tokenizer_image_token`): the conversation is rendered as LLaVA renders it (`</s>` written as text after each
answer), the text is split at the image and each piece is tokenised by itself, BOS on the first piece only.
Loss masks come from token positions (the token the tokenizer reports for each character), never by
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


class Encoded(Protocol):
    """One text's tokens: what `tokenizers.Encoding` offers (its ids, and the token holding a character)."""

    @property
    def ids(self) -> list[int]: ...

    def char_to_token(self, char_pos: int, sequence_index: int = 0) -> int | None: ...


# texts -> their encodings, without special tokens: what the tokenizer's Rust pipeline gives
# (`tokenizers.Tokenizer.encode_batch(texts, add_special_tokens=False)`)
EncodeBatch = Callable[[list[str]], list[Encoded]]


@dataclass
class OffsetEncoding:
    """`Encoded` from ids and each token's character offsets (a tokenizer without a Rust pipeline)."""

    ids: list[int]
    offsets: Sequence[tuple[int, int]]

    def char_to_token(self, char_pos: int, sequence_index: int = 0) -> int | None:
        k = bisect_left(self.offsets, (char_pos + 1,)) - 1  # the last token starting at or before char_pos
        while k > 0 and self.offsets[k - 1][0] == self.offsets[k][0]:  # byte tokens of one character: the first
            k -= 1
        return k if k >= 0 and self.offsets[k][0] <= char_pos < self.offsets[k][1] else None


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


@dataclass
class Segments:
    """A conversation rendered as LLaVA renders it, before tokenisation.

    `pieces` are the texts around the image (two with an image, the second starting right after it; one without);
    `supervised[k]` are the character ranges [start, end) of piece k that are trained on: each answer with the
    space that joins it to `ASSISTANT:`, through the EOS text written after it. `image_prefix` is the text before
    the image in this style: a text-only conversation puts its (masked) image slots where that text's tokens
    end, so every row shares one image start.
    """

    pieces: list[str] = field(default_factory=list)
    supervised: list[list[tuple[int, int]]] = field(default_factory=list)
    has_image: bool = True
    image_prefix: str = ""
    num_answers: int = 0

    def texts(self) -> list[str]:
        """The strings the tokenizer is given (the pieces), in order."""
        return self.pieces


class _Piece:
    """A piece's text built part by part, with the character ranges of its supervised parts."""

    def __init__(self, text: str = "") -> None:
        self.chunks, self.ranges, self.pos = [text], [], len(text)

    def add(self, text: str) -> None:
        self.chunks.append(text)
        self.pos += len(text)

    def answer(self, text: str, eos_text: str, where: str) -> None:
        """An answer (`text` with its leading separator) and its EOS, supervised. The separator, the space after
        `ASSISTANT:`, is supervised with the answer as in LLaVA's targets (which start right after `ASSISTANT:`):
        a tokenizer that writes that space as a token of its own (`▁` before a digit, in Llama's) learns it."""
        if not text.strip():
            raise PromptError("empty_answer", where)
        start = self.pos
        self.add(text + eos_text)
        self.ranges.append((start, self.pos))

    def text(self) -> str:
        return "".join(self.chunks)


def conversation_segments(
    conversations: list[dict], style: str, for_generation: bool = False, eos_text: str = "</s>"
) -> Segments:
    """One LLaVA conversation in `style` rendered as text (see `encode_conversation`), `eos_text` (the tokenizer's
    EOS text) after each answer, split at the image.

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
        caption = _Piece()
        if pairs[0][1] is not None:
            caption.answer(pairs[0][1].strip(), eos_text, "turn 1")
        pieces = ([_Piece()] if has_image else []) + [caption]
        return _segments(pieces, has_image, "", len(caption.ranges))

    prefix = f"{SYSTEM_PROMPTS[style]} USER: "
    first = _strip_image(pairs[0][0])
    if has_image:  # `{SYSTEM} USER: <image>\n{q1} ASSISTANT:` split at the image
        pieces = [_Piece(prefix), _Piece(f"\n{first} ASSISTANT:" if first else " ASSISTANT:")]
    else:
        pieces = [_Piece(f"{prefix}{first} ASSISTANT:")]
    rest = pieces[-1]
    for k, (q, a) in enumerate(pairs):
        if k:
            rest.add(f"USER: {_strip_image(q)} ASSISTANT:")
        if a is None:
            break
        rest.answer(f" {a.strip()}", eos_text, f"turn {2 * k + 1}")
    return _segments(pieces, has_image, prefix, len(rest.ranges))


def _segments(pieces: list[_Piece], has_image: bool, prefix: str, num_answers: int) -> Segments:
    return Segments([p.text() for p in pieces], [p.ranges for p in pieces], has_image, prefix, num_answers)


def _supervised(enc: Encoded, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token index ranges [i, j) from the token holding the first character of each supervised character range to
    the one holding its last (the tokens that cover the range: a token straddling its start is included)."""
    spans = []
    for r0, r1 in ranges:
        first, last = enc.char_to_token(r0), enc.char_to_token(r1 - 1)
        if first is None:  # a character no token holds (none in the tokenizers tested): the next one that is held
            first = next((t for c in range(r0 + 1, r1) if (t := enc.char_to_token(c)) is not None), None)
        if last is None:
            last = next((t for c in range(r1 - 2, r0 - 1, -1) if (t := enc.char_to_token(c)) is not None), None)
        if first is None or last is None:
            raise ValueError(f"the tokenizer reports no token for the characters {r0}-{r1} of a supervised answer")
        spans.append((first, last + 1))
    return spans


def _assemble(
    seg: Segments,
    encoded: dict[str, Encoded],
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
    for k, (text, ranges) in enumerate(zip(seg.pieces, seg.supervised, strict=True)):
        if k == 1:
            image_start = len(ids)
            ids += [pad_id] * num_patches
            mask += [0] * num_patches
        enc = encoded[text]
        tokens = enc.ids
        base = len(ids)
        ids += tokens
        mask += [0] * len(tokens)
        for i, j in _supervised(enc, ranges):
            if j <= i or tokens[j - 1] != eos:
                raise ValueError(
                    f"the tokenizer does not encode its EOS text as the EOS id {eos} after an answer in {text!r}"
                )
            mask[base + i : base + j] = [1] * (j - i)
            spans.append((base + i, base + j))
    if not seg.has_image:
        if (spans and spans[0][0] < image_start) or len(ids) < image_start:  # the first question holds the index
            raise ValueError(f"a text-only conversation's image slots at {image_start} would split an answer")
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
) -> list[EncodedConversation]:
    """Encode many conversations with one batched tokeniser call (the HDF5 writer's path; evaluation's too).

    `encode_batch(texts)` returns, for each text, its encoding without special tokens (`Encoded`: its ids, and
    which token holds a character; `backend_encoder`, `batch_encoder`). Each distinct text is tokenised once
    (the first piece, the system prompt, is the same in every conversation of a style).
    """
    texts = {seg.image_prefix: None for seg in segments}
    texts.update((text, None) for seg in segments for text in seg.pieces)
    unique = [t for t in texts if t]
    encoded: dict[str, Encoded] = {"": OffsetEncoding([], [])}
    encoded.update(zip(unique, encode_batch(unique) if unique else [], strict=True))
    starts = {prefix: 1 + len(encoded[prefix].ids) for prefix in {seg.image_prefix for seg in segments}}
    return [_assemble(seg, encoded, bos, eos, num_patches, pad_id, starts[seg.image_prefix]) for seg in segments]


def backend_encoder(backend) -> EncodeBatch:
    """`EncodeBatch` over a `tokenizers.Tokenizer` (a fast tokenizer's Rust pipeline; the writer's workers)."""

    def encode_batch(texts: list[str]) -> list[Encoded]:
        return backend.encode_batch(texts, add_special_tokens=False)

    return encode_batch


def batch_encoder(tokenizer) -> EncodeBatch:
    """`EncodeBatch` for a transformers tokenizer: its Rust pipeline when it has one, else its own offsets."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend_encoder(backend)

    def encode_batch(texts: list[str]) -> list[Encoded]:
        try:
            out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise ValueError(
                f"{type(tokenizer).__name__} reports no token offsets; the encoder needs a fast tokenizer "
                "(a folder with tokenizer.json)"
            ) from None
        return [
            OffsetEncoding(i, [tuple(o) for o in offs])
            for i, offs in zip(out["input_ids"], out["offset_mapping"], strict=True)
        ]

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
    bos, eos = _special_ids(tokenizer)
    eos_text = tokenizer.eos_token
    if not eos_text:
        raise ValueError("tokenizer must define eos_token (its text is written after each answer)")
    seg = conversation_segments(conversations, style, for_generation, eos_text)
    return encode_segments_batch([seg], batch_encoder(tokenizer), bos, eos, num_patches, pad_id)[0]


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
