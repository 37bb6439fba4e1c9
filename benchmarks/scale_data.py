"""Generated LLaVA-format sources for the growth benchmark: any number of records, a small pool of real images.

- `pretrain.json`, as LLaVA-Pretrain (blip_laion_cc_sbu_558k): one caption request, `<image>` first or last, and a
  caption of 10-30 words.
- `instruct.json`, as llava_v1_5_mix665k: short-answer VQA with many turns, open questions with a few, detailed
  descriptions (40-100 words), and text-only conversations with long answers (a few longer than the tiny preset's
  sequence length: the writer drops them, counted, as it drops real ones).
- `images/`: `POOL` JPEG photos-like files (224-640 px a side, shaded backgrounds, shapes and noise, 20-60 KB) that
  the records reuse by path, so that a million records need 10 MB of images, not 100 GB.
Words are the tiny tokenizer's whole-word tokens, so a word is one or two tokens, as English is for Llama's
tokenizer (about 1.3 a word). Both files are written one record at a time (bounded memory at any size).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

POOL = 300
CAPTION_REQUESTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
)
SHORT = "Answer the question using a single word or phrase."


def words_of(tokenizer_json: Path) -> list[str]:
    """The tokenizer's whole-word tokens (letters only, 2 characters or more)."""
    vocab = json.loads(Path(tokenizer_json).read_text())["model"]["vocab"]
    words = sorted({w for t in vocab if t.startswith("▁") and (w := t[1:]).isalpha() and w.islower() and len(w) < 13})
    if len(words) < 20:
        raise ValueError(f"{tokenizer_json}: too few whole-word tokens ({len(words)}) to make text from")
    return words


class Text:
    def __init__(self, words: list[str], rng: random.Random) -> None:
        self.words, self.rng = words, rng

    def sentence(self, lo: int, hi: int, end: str = ".") -> str:
        n = self.rng.randint(lo, hi)
        text = " ".join(self.rng.choices(self.words, k=n))
        return text[:1].upper() + text[1:] + end

    def paragraph(self, lo: int, hi: int) -> str:
        """`lo`-`hi` words in sentences of 8-20."""
        left, parts = self.rng.randint(lo, hi), []
        while left > 0:
            n = min(left, self.rng.randint(8, 20))
            parts.append(self.sentence(n, n))
            left -= n
        return " ".join(parts)


def _turns(pairs: list[tuple[str, str]]) -> list[dict]:
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def pretrain_record(k: int, t: Text, image: str) -> dict:
    request = t.rng.choice(CAPTION_REQUESTS)
    prompt = f"<image>\n{request}" if t.rng.random() < 0.5 else f"{request}\n<image>"
    return {"id": f"{k:09d}", "image": image, "conversations": _turns([(prompt, t.sentence(10, 30))])}


def instruct_record(k: int, t: Text, image: str) -> dict:
    """One record of mix665k's kinds, drawn by their rough shares."""
    r = t.rng.random()
    if r < 0.40:  # VQAv2 / GQA: short answers, many turns
        pairs = [(t.sentence(4, 10, "?"), t.sentence(1, 3, "")) for _ in range(t.rng.randint(2, 10))]
        pairs[0] = (f"{pairs[0][0]}\n{SHORT}", pairs[0][1])
    elif r < 0.80:  # LLaVA conversations: open questions, a few turns
        pairs = [(t.sentence(6, 14, "?"), t.sentence(5, 25)) for _ in range(t.rng.randint(1, 4))]
    elif r < 0.92:  # detailed description and reasoning
        pairs = [(t.sentence(8, 16, "?"), t.paragraph(40, 100))]
    else:  # ShareGPT: text only, long answers
        pairs = [(t.sentence(10, 30, "?"), t.paragraph(30, 90)) for _ in range(t.rng.randint(1, 2))]
        return {"id": f"{k:09d}", "conversations": _turns(pairs)}
    pairs[0] = (f"<image>\n{pairs[0][0]}", pairs[0][1])
    return {"id": f"{k:09d}", "image": image, "conversations": _turns(pairs)}


def image_pool(folder: Path, count: int = POOL, seed: int = 0) -> list[str]:
    """`count` JPEGs in `folder` (made once; kept between sizes); their names relative to the source folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        name = f"img_{i:04d}.jpg"
        names.append(f"{folder.name}/{name}")
        if (folder / name).is_file():
            continue
        w, h = (int(x) for x in rng.integers(224, 641, 2))
        base = np.linspace(rng.integers(0, 256, 3), rng.integers(0, 256, 3), h)[:, None, :].repeat(w, 1)
        img = Image.fromarray((base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        img.filter(ImageFilter.GaussianBlur(1)).save(folder / name, quality=85)
    return names


def write_array(path: Path, records: Iterator[dict]) -> int:
    """A JSON array, one record per line, written as the records come."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for rec in records:
            f.write(("," if n else "") + json.dumps(rec) + "\n")
            n += 1
        f.write("]\n")
    return n


def write_sources(folder: Path, n: int, tokenizer_json: Path, seed: int = 0) -> dict[str, int]:
    """`pretrain.json` and `instruct.json` of `n` records each in `folder`, over its image pool."""
    images = image_pool(folder / "images", seed=seed)
    words = words_of(tokenizer_json)
    out = {}
    for name, make, salt in (("pretrain.json", pretrain_record, 1), ("instruct.json", instruct_record, 2)):
        t = Text(words, random.Random(seed * 1000 + salt))
        out[name] = write_array(folder / name, (make(k, t, t.rng.choice(images)) for k in range(n)))
    return out
