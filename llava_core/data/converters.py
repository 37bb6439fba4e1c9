"""Stage 2 converters: one per upstream format (docs/stages.md lists them), chosen by name from `CONVERTERS`.

A converter is a generator over the files of a downloaded source: it yields candidate LLaVA records (image
paths relative to the source folder) or `Drop(reason)` for an input item it cannot use. A whole file that
cannot be read is an error naming the file. `convert.validate_record` then checks every record once.
The parquet formats (ArxivCAP, synthdog-en) carry image bytes: their converters write the images into
`ConvertInput.image_dir` and name them by `ConvertInput.image_rel`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from llava_core.data.prompts import IMAGE_PLACEHOLDER, PROMPT_SUFFIXES, suffix_name, with_suffix


class Drop(Exception):
    """Raised (or yielded) by a converter for one input item; `reason` is counted in the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ConvertInput:
    """What a converter reads: the source folder, the dataset's files, its options, where images go."""

    root: Path  # data/raw/<source>
    files: list[Path]  # what the dataset's `file` names (a file, a folder, a glob), sorted
    options: dict = field(default_factory=dict)  # the converter's defaults updated by the dataset's options
    image_dir: Path | None = None  # converters with image bytes write here
    image_rel: str = ""  # image_dir relative to root, as records name it

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


Item = dict | Drop


@dataclass(frozen=True)
class Converter:
    fn: Callable[[ConvertInput], Iterator[Item]]
    folder_glob: str = "*.json"  # the files a folder named in `file` stands for
    options: dict = field(default_factory=dict)  # the accepted options and their defaults
    writes_images: bool = False
    doc: str = ""


# --- shared helpers ---------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    """A source file's text: UTF-8 (a byte-order mark is allowed); anything else is an error naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def load_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _expect(path: Path, data: Any, kind: type, what: str) -> Any:
    if not isinstance(data, kind):
        raise ValueError(f"{path}: expected {what}, got {type(data).__name__}")
    return data


def _join(*parts: str) -> str:
    return PurePosixPath(*[p for p in parts if p]).as_posix()


def _text(value: Any) -> str | None:
    """A question/answer field as text: strings stripped, numbers as written; anything else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def qa_record(rec_id: str, image: str | None, question: str, answer: str) -> dict:
    human = f"{IMAGE_PLACEHOLDER}\n{question}" if image is not None else question
    rec = {"id": rec_id, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


def add_suffix(conversations: list[dict], name: str) -> list[dict]:
    """The option `suffix: <name>`: each human turn that ends with no evaluation suffix gets `PROMPT_SUFFIXES[name]`
    on its own line after the question, as LLaVA-1.5's mix665k writes its VQA (short_answer) and multiple-choice
    turns; `none` changes nothing."""
    if not PROMPT_SUFFIXES[name]:
        return conversations
    return [
        {**t, "value": with_suffix(t["value"], PROMPT_SUFFIXES[name])}
        if t["from"] == "human" and suffix_name(t["value"]) == "none"
        else t
        for t in conversations
    ]


IMAGE_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"), (b"RIFF", ".webp"))


def _write_image(inp: ConvertInput, stem: str, data: bytes) -> str:
    """Image bytes -> `image_dir/<stem><ext>` (extension from the bytes); returns the path records use."""
    ext = next((e for magic, e in IMAGE_MAGIC if data.startswith(magic)), ".img")
    name = f"{stem}{ext}"
    assert inp.image_dir is not None
    (inp.image_dir / name).write_bytes(data)
    return _join(inp.image_rel, name)


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a damaged file
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    missing = sorted(set(columns) - set(pf.schema_arrow.names))
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; columns: {pf.schema_arrow.names}")
    for batch in pf.iter_batches(columns=columns, batch_size=256):
        yield from batch.to_pylist()


# --- json -> jsonl: LLaVA-Pretrain, ShareGPT4V-PT, mix665k, ShareGPT4V-SFT ----------------------------------
def llava_json(inp: ConvertInput) -> Iterator[Item]:
    for path in inp.files:
        for item in json_array_items(path):
            yield item if isinstance(item, dict) else Drop("not_an_object")


READ_CHARS = 1 << 20  # characters read at a time by json_array_items
MAX_ITEM_CHARS = 1 << 26  # an array element longer than this (64 Mi characters) is not a record: an error
AFTER_ELEMENT = " \t\r\n,]"  # what may follow an array element in valid JSON


def json_array_items(path: Path) -> Iterator[Any]:
    """The elements of the JSON array in `path`, one at a time: memory is bounded by the longest element, not the
    file (LLaVA-Pretrain's 558k records are a 180 MB array). Errors name the file as `load_json` does; a file
    that is not an array is read whole (`_expect` names what it is)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:
        buf, pos, eof = "", 0, False

        def more() -> bool:
            nonlocal buf, pos, eof
            try:
                chunk = f.read(READ_CHARS)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e})") from None
            buf, pos, eof = buf[pos:] + chunk, 0, not chunk
            return bool(chunk)

        def skip_space() -> str:  # the next non-blank character ('' at the end of the file)
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos : pos + 1]

        if skip_space() != "[":
            _expect(path, load_json(path), list, "a JSON array of records")  # raises, naming what the file holds
        pos += 1
        first, count = True, 0
        while (c := skip_space()) != "]":
            if not first:
                if c != ",":
                    raise ValueError(f"{path}: not valid JSON (expected ',' or ']' after element {count})")
                pos += 1
                skip_space()
            first = False
            while True:  # an element, read further until it is whole and what follows it is in the buffer
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    if eof or (end < len(buf) and buf[end] in AFTER_ELEMENT):  # not a number cut short
                        break
                except json.JSONDecodeError as e:
                    if eof:
                        raise ValueError(f"{path}: not valid JSON ({e})") from None
                if len(buf) - pos > MAX_ITEM_CHARS:
                    raise ValueError(f"{path}: not valid JSON (an element longer than {MAX_ITEM_CHARS} characters)")
                more()
            pos = end
            count += 1
            yield item
        pos += 1
        if skip_space():
            raise ValueError(f"{path}: not valid JSON (extra data after the array)")


# --- AI2D ---------------------------------------------------------------------------------------------------
def ai2d(inp: ConvertInput) -> Iterator[Item]:
    """One JSON per image: `imageName`, `questions: {text: {questionId, answerTexts[], correctAnswer}}`."""
    for path in inp.files:
        d = _expect(path, load_json(path), dict, "a JSON object (one AI2D image)")
        name, questions = d.get("imageName"), d.get("questions")
        if not isinstance(name, str) or not isinstance(questions, dict):
            yield Drop("missing_fields")
            continue
        for question, q in questions.items():
            answers = q.get("answerTexts") if isinstance(q, dict) else None
            correct = q.get("correctAnswer") if isinstance(q, dict) else None
            qid = q.get("questionId") if isinstance(q, dict) else None
            if (
                not isinstance(answers, list)
                or not answers
                or isinstance(correct, bool)
                or not isinstance(correct, int)
                or qid is None
            ):
                yield Drop("missing_fields")
                continue
            if not 0 <= correct < len(answers) or len(answers) > 26:
                yield Drop("answer_out_of_range")
                continue
            labelled = [f"{chr(97 + i)}) {a}" for i, a in enumerate(answers)]
            image = _join(inp.options["image_folder"], name)
            yield qa_record(str(qid), image, f"{question} {' '.join(labelled)}", labelled[correct])


# --- ArxivQA ------------------------------------------------------------------------------------------------
LETTER = re.compile(r"\(?([A-I])\)?[.:]?")


def arxivqa(inp: ConvertInput) -> Iterator[Item]:
    """jsonl of `{id, image, question, options[], label, rationale}`; the answer is the option and the rationale."""
    for path in inp.files:
        for line in read_text(path).splitlines():
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                yield Drop("invalid_json")
                continue
            if not isinstance(d, dict):
                yield Drop("not_an_object")
                continue
            question, options = _text(d.get("question")), d.get("options") or []
            if d.get("id") is None or not isinstance(d.get("image"), str) or question is None:
                yield Drop("missing_fields")
                continue
            if not isinstance(options, list):
                yield Drop("missing_fields")
                continue
            label, rationale = _text(d.get("label")) or "", _text(d.get("rationale")) or ""
            m = LETTER.fullmatch(label)
            if m:
                k = ord(m.group(1)) - ord("A")
                if k >= len(options):
                    yield Drop("answer_out_of_range")
                    continue
                label = str(options[k]).strip()
            if not label and not rationale:
                yield Drop("empty_answer")
                continue
            answer = "\n".join(x for x in (label, rationale) if x)
            human = "\n".join([question, *(str(o).strip() for o in options)])
            yield qa_record(str(d["id"]), _join(inp.options["image_folder"], d["image"]), human, answer)


# --- ArxivCAP -----------------------------------------------------------------------------------------------
CAPTION_PROMPT = "Create a caption for the provided figure."


def arxivcap(inp: ConvertInput) -> Iterator[Item]:
    """Parquet, column `caption_images: [{caption, cil_pairs: [{image_file, image: {bytes}}]}]`.

    Single-figure entries become caption samples (the image bytes written out); multi-figure entries are
    dropped as `multiple_images` (a record carries one image).
    """
    for f_idx, path in enumerate(inp.files):
        for row_idx, row in enumerate(_parquet_rows(path, ["caption_images"])):
            entries = row["caption_images"]
            if not isinstance(entries, list) or not entries:
                yield Drop("missing_fields")
                continue
            for k, entry in enumerate(entries):
                caption = _text(entry.get("caption")) if isinstance(entry, dict) else None
                pairs = entry.get("cil_pairs") if isinstance(entry, dict) else None
                if caption is None or not isinstance(pairs, list) or not pairs:
                    yield Drop("missing_fields")
                    continue
                if len(pairs) != 1:
                    yield Drop("multiple_images")
                    continue
                image = pairs[0].get("image") if isinstance(pairs[0], dict) else None
                data = image.get("bytes") if isinstance(image, dict) else None
                if not data:
                    yield Drop("image_missing")
                    continue
                rel = _write_image(inp, f"{f_idx:03d}_{row_idx:07d}_{k:02d}", data)
                yield qa_record(f"arxivcap-{path.stem}-{row_idx}-{k}", rel, CAPTION_PROMPT, caption)


# --- ChartQA ------------------------------------------------------------------------------------------------
def chartqa(inp: ConvertInput) -> Iterator[Item]:
    """`{split}/{split}_{human|augmented}.json`: `[{imgname, query, label}]`; images `{split}/png/{imgname}`."""
    for path in inp.files:
        data = _expect(path, load_json(path), list, "a JSON array of ChartQA questions")
        split, _, part = path.stem.rpartition("_")
        folder = inp.rel(path.parent) if path.parent != inp.root else ""
        for i, d in enumerate(data):
            if not isinstance(d, dict):
                yield Drop("not_an_object")
                continue
            img, query, label = d.get("imgname"), _text(d.get("query")), _text(d.get("label"))
            if not isinstance(img, str) or query is None or label is None:
                yield Drop("missing_fields")
                continue
            image = _join(folder, inp.options["image_folder"], img)
            yield qa_record(f"chartqa-{split or path.stem}-{part}-{i}", image, query, label)


# --- DocVQA (single page), InfographicVQA -------------------------------------------------------------------
def _docvqa_like(inp: ConvertInput, image_key: str, id_prefix: str) -> Iterator[Item]:
    for path in inp.files:
        d = _expect(path, load_json(path), dict, "a JSON object with 'data'")
        data = _expect(path, d.get("data"), list, "'data' to be a list of questions")
        folder = inp.options["image_folder"]
        if folder is None:
            folder = inp.rel(path.parent) if path.parent != inp.root else ""
        for q in data:
            if not isinstance(q, dict):
                yield Drop("not_an_object")
                continue
            answers = q.get("answers")
            question, image = _text(q.get("question")), q.get(image_key)
            answer = _text(answers[0]) if isinstance(answers, list) and answers else None
            if q.get("questionId") is None or question is None or not isinstance(image, str) or answer is None:
                yield Drop("missing_fields")
                continue
            yield qa_record(f"{id_prefix}-{q['questionId']}", _join(folder, image), question, answer)


def docvqa(inp: ConvertInput) -> Iterator[Item]:
    """`{split}.json`: `{data: [{questionId, question, image, answers[]}]}`; the answer is `answers[0]`."""
    return _docvqa_like(inp, "image", "docvqa")


def infographicvqa(inp: ConvertInput) -> Iterator[Item]:
    """`infographicsVQA_{split}.json`: as DocVQA with the image in `image_local_name`."""
    return _docvqa_like(inp, "image_local_name", "infovqa")


# --- DVQA ---------------------------------------------------------------------------------------------------
def dvqa(inp: ConvertInput) -> Iterator[Item]:
    """`qa/train_qa.json`: `[{question_id, image, question, answer}]`; images `images/{image}`."""
    for path in inp.files:
        data = _expect(path, load_json(path), list, "a JSON array of DVQA questions")
        for d in data:
            if not isinstance(d, dict):
                yield Drop("not_an_object")
                continue
            question, answer, image = _text(d.get("question")), _text(d.get("answer")), d.get("image")
            if d.get("question_id") is None or question is None or answer is None or not isinstance(image, str):
                yield Drop("missing_fields")
                continue
            image = _join(inp.options["image_folder"], image)
            yield qa_record(f"dvqa-{d['question_id']}", image, question, answer)


# --- synthdog-en --------------------------------------------------------------------------------------------
# The "describe briefly" prompts of the LLaVA recipe; one is picked per row by a seeded generator.
BRIEF_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)


def synthdog(inp: ConvertInput) -> Iterator[Item]:
    """Parquet with `image: {bytes}` and `ground_truth` (JSON text at `gt_parse.text_sequence`)."""
    rng = random.Random(inp.options["seed"])
    for f_idx, path in enumerate(inp.files):
        for row_idx, row in enumerate(_parquet_rows(path, ["image", "ground_truth"])):
            prompt = rng.choice(BRIEF_PROMPTS)  # drawn for every row, so a drop does not shift later choices
            image = row["image"]
            data = image.get("bytes") if isinstance(image, dict) else None
            try:
                gt = json.loads(row["ground_truth"]) if isinstance(row["ground_truth"], str) else None
            except json.JSONDecodeError:
                gt = None
            parse = gt.get("gt_parse") if isinstance(gt, dict) else None
            text = _text(parse.get("text_sequence")) if isinstance(parse, dict) else None
            if text is None:
                yield Drop("missing_fields")
                continue
            if not data:
                yield Drop("image_missing")
                continue
            rel = _write_image(inp, f"{f_idx:03d}_{row_idx:07d}", data)
            yield qa_record(f"synthdog-{path.stem}-{row_idx}", rel, prompt, text)


# The converters that write questions take `suffix` (a PROMPT_SUFFIXES name; `none`, the default, adds nothing).
ASKS = {"suffix": "none"}
CONVERTERS: dict[str, Converter] = {
    "llava_json": Converter(
        llava_json, options=ASKS, doc="LLaVA-Pretrain, ShareGPT4V-PT, mix665k, ShareGPT4V-SFT (json array)"
    ),
    "ai2d": Converter(ai2d, options={"image_folder": "images", **ASKS}, doc="AI2D questions/*.json"),
    "arxivqa": Converter(arxivqa, folder_glob="*.jsonl", options={"image_folder": "", **ASKS}, doc="ArxivQA jsonl"),
    "arxivcap": Converter(arxivcap, folder_glob="*.parquet", writes_images=True, doc="ArxivCAP parquet"),
    "chartqa": Converter(chartqa, folder_glob="*/*_*.json", options={"image_folder": "png", **ASKS}, doc="ChartQA"),
    "docvqa": Converter(docvqa, options={"image_folder": None, **ASKS}, doc="DocVQA single page"),
    "infographicvqa": Converter(infographicvqa, options={"image_folder": None, **ASKS}, doc="InfographicVQA"),
    "dvqa": Converter(dvqa, options={"image_folder": "images", **ASKS}, doc="DVQA qa/*.json"),
    "synthdog": Converter(
        synthdog, folder_glob="*.parquet", options={"seed": None}, writes_images=True, doc="synthdog-en parquet"
    ),
}
