"""An independent implementation of LLaVA's preprocessing, written from its documented behaviour (for tests).

What LLaVA does (haotian-liu/LLaVA: llava/conversation.py, llava/mm_utils.py, llava/train/train.py), restated:
- `preprocess_multimodal`: a turn holding `<image>` loses it and gets it back in front: `<image>\\n{text}`.
- The v1 template (`vicuna_v1`, `llava_v1`, separator style TWO): `{system} USER: {q1} ASSISTANT: {a1}</s>USER:
  {q2} ASSISTANT: {a2}</s>`; a turn without a message (a generation prompt) renders as `ASSISTANT:`.
- `plain`: the first turn becomes `<image>` alone, then the caption, then `\\n`.
- `tokenizer_image_token`: split at `<image>`, tokenise every piece with the tokenizer's own call (it adds BOS),
  keep the BOS of the first piece only, put IMAGE_TOKEN_INDEX between pieces. A record without an image is
  tokenised whole, in one call.
- v1 targets: the first token is ignored; the text is split into rounds at `</s>`, each round at
  ` ASSISTANT: `; per round, `len(round tokens)` positions are consumed and the first `len(instruction + sep
  tokens) - 2` of them ignored (BOS and the trailing space of `ASSISTANT: `); for a non-legacy tokenizer both
  lengths are one smaller after the first round. When the consumed length differs from the sequence's non-pad
  length, every target is ignored (LLaVA's "tokenization mismatch").
- plain targets: the first `len(tokenizer_image_token("<image>"))` positions are ignored.
The rows this project writes then follow Cerebras: the image index expanded to `num_patches` pad slots,
`inputs = tokens[:-1]`, `labels = tokens[1:]` (phase-1 rows end on `</s>` where LLaVA's plain ends on `\\n`).
"""

from __future__ import annotations

import numpy as np

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
IMAGE = "<image>"
SYSTEMS = {
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
}


def move_image_first(conversations: list[dict]) -> list[dict]:
    out = []
    for turn in conversations:
        value = turn["value"]
        if IMAGE in value:
            value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
        out.append({"from": turn["from"], "value": value})
    return out


def render_v1(conversations: list[dict], style: str, for_generation: bool = False) -> str:
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    text = SYSTEMS[style] + " "
    messages = [(roles[t["from"]], t["value"]) for t in move_image_first(conversations)]
    if for_generation:
        messages.append(("ASSISTANT", None))
    for i, (role, message) in enumerate(messages):
        text += (f"{role}: {message}" + (" ", "</s>")[i % 2]) if message else f"{role}:"
    return text


def render_plain(conversations: list[dict]) -> str:
    return IMAGE + conversations[1]["value"] + "\n"


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    pieces = [tokenizer(piece).input_ids for piece in prompt.split(IMAGE)]
    skip = 1 if pieces[0][:1] == [tokenizer.bos_token_id] else 0  # every later piece then loses its first (BOS)
    ids = pieces[0][:]
    for piece in pieces[1:]:
        ids += [IMAGE_TOKEN_INDEX] + piece[skip:]
    return ids


def _tokenize(text: str, tokenizer, has_image: bool) -> list[int]:
    return tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids


def targets_v1(prompt: str, ids: list[int], tokenizer, has_image: bool, legacy: bool) -> list[int]:
    target = list(ids)
    total = sum(t != tokenizer.pad_token_id for t in ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:cur] = [IGNORE_INDEX]
    for i, rnd in enumerate(prompt.split("</s>")):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        round_len = len(_tokenize(rnd, tokenizer, has_image))
        instruction_len = len(_tokenize(parts[0] + sep, tokenizer, has_image)) - 2
        if i != 0 and not legacy:
            round_len -= 1
            instruction_len -= 1
        target[cur : cur + instruction_len] = [IGNORE_INDEX] * len(target[cur : cur + instruction_len])
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * len(target[cur:])
    if cur != total:  # LLaVA's "tokenization mismatch": the whole conversation is ignored
        return [IGNORE_INDEX] * len(target)
    return target


def llava_sequence(conversations: list[dict], tokenizer, style: str, legacy: bool) -> tuple[list[int], list[int]]:
    """(input_ids, targets) exactly as LLaVA's training preprocessing builds them (image as IMAGE_TOKEN_INDEX)."""
    has_image = any(IMAGE in t["value"] for t in conversations)
    if style == "plain":
        prompt = render_plain(conversations[:2])
        ids = tokenizer_image_token(prompt, tokenizer)
        ignored = len(tokenizer_image_token(IMAGE, tokenizer))
        return ids, [IGNORE_INDEX] * ignored + ids[ignored:]
    prompt = render_v1(conversations, style)
    ids = _tokenize(prompt, tokenizer, has_image)
    return ids, targets_v1(prompt, ids, tokenizer, has_image, legacy)


def llava_generation_prompt(question: str, tokenizer, style: str) -> list[int]:
    """LLaVA's evaluation prompt (`model_vqa_loader`): `<image>\\n{question}`, then `ASSISTANT:`."""
    return tokenizer_image_token(
        render_v1([{"from": "human", "value": f"{IMAGE}\n{question}"}], style, True), tokenizer
    )


def expand_image(
    ids: list[int], targets: list[int], num_patches: int, pad_id: int, image_start: int
) -> tuple[list[int], list[int]]:
    """The image index as `num_patches` pad slots (never targets); a sequence without one gets its slots at
    `image_start` (the rows' one image index; they are masked out of attention)."""
    at = ids.index(IMAGE_TOKEN_INDEX) if IMAGE_TOKEN_INDEX in ids else image_start
    drop = 1 if IMAGE_TOKEN_INDEX in ids else 0
    ids = ids[:at] + [pad_id] * num_patches + ids[at + drop :]
    targets = targets[:at] + [IGNORE_INDEX] * num_patches + targets[at + drop :]
    return ids, targets


def cerebras_row(
    tokens: list[int], targets: list[int], msl: int, pad_id: int, has_image: bool, image_start: int, num_patches: int
) -> np.ndarray:
    """(4, MSL): inputs = tokens[:-1], loss mask of labels = tokens[1:], labels, key_padding_mask."""
    n = len(tokens) - 1
    row = np.zeros((4, msl), dtype=np.int32)
    row[0] = pad_id
    row[2] = pad_id
    row[0, :n] = tokens[:-1]
    row[1, :n] = [t != IGNORE_INDEX for t in targets[1:]]
    row[2, :n] = tokens[1:]
    row[3, n:] = 1
    if not has_image:
        row[3, image_start : image_start + num_patches] = 1
    return row
