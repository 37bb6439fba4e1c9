"""The bad-input corpus: every case is one bad input given to a real stage function on a tiny workspace, with
the exact outcome it must have.

- `Rejected(reason)`: the stage completes; the bad item is counted under `reason` in the stage's own report
  (the conversion report's `dropped`, the HDF5 `discarded_by_reason`) and every good item is kept.
- `Accepted(note)`: an odd but usable input: kept, and counted under `note` when one is given.
- `Fails(error, pattern)`: the stage raises `error` whose message matches `pattern` (it names the file, line,
  member or question and the problem); nothing is at the stage's final path and no temporary is left.

Stages: `download` (a local source with `extract: true`), `convert`, `hdf5`, `evaluate`, `config` (the params
file every stage loads). `CASES` is the corpus; `ELSEWHERE` lists the bad inputs the per-stage tests already
try (not repeated here), each by the test that tries it:

| kind | in this corpus | already tried by |
|---|---|---|
| malformed jsonl / JSON | hdf5 lines (list, null, wrong types, a turn without `from`), arxivqa lines, eval lines | test_hdf5 (unparseable line), test_convert (JSON not an array, not an object, missing fields) |
| truncated jsonl / file | hdf5 last line cut, arxivqa last line cut | test_convert (truncated JSON file) |
| non-UTF-8 text | hdf5 line, lone surrogate escapes (convert, hdf5, eval), arxivqa file, UTF-16 JSON, eval file | test_convert (Latin-1 bytes in a JSON file) |
| empty file | convert (0 bytes, `[]`), parquet (0 bytes), hdf5 (every input empty), eval questions | - |
| missing image | eval question | test_convert, test_hdf5 |
| truncated image | - | test_convert, test_hdf5, test_images |
| corrupt image | garbage bytes and a 0-byte file (convert, hdf5) | test_images |
| GIF named .jpg | animated GIF named .jpg (hdf5), GIF named .jpg (convert) | test_hdf5, test_images |
| `..` in image path | eval question | test_convert, test_hdf5, test_images |
| absolute image path | hdf5 | test_convert, test_images |
| link leaving the image root | file and folder links (convert, hdf5) | test_images |
| unsafe archive entry | zip absolute / drive letter / backslash `..`, tar FIFO / block device / absolute hard link | test_download_remote (tar absolute, `..`, symlinks out, hard link out, char device; zip `..`, zip symlink out) |
| damaged archive or data file | truncated tar.gz, garbage zip, empty zip, zip member with a bad CRC, garbage parquet | - |
| odd number of turns | three turns (hdf5) | test_convert, test_hdf5 |
| `<image>` count mismatch | none with an image, in a later turn, in an answer, in a text-only record (hdf5) | test_convert (4), test_hdf5 (two) |
| longer than MSL | phase-1 caption | test_hdf5 (phase 2) |
| tokenizer without its special tokens | no BOS, no EOS, neither pad nor unk, empty folder, damaged tokenizer.json | - |
| wrong field types | image not a string, empty image path | test_convert |
| malformed params file | not YAML, not UTF-8, not a mapping | test_config (unknown keys, presets, values) |

`python -m tests.test_reliability_inputs` prints the figures docs/reliability.md quotes.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from llava_core.config import ConfigError
from llava_core.data.convert import convert
from llava_core.data.fetch import CorruptArchiveError, UnsafeArchiveError
from llava_core.data.hdf5_writer import build_hdf5
from llava_core.data.sources import download
from llava_core.data.tokenizer import TokenizerError
from llava_core.params import load_config
from tests.helpers_reliability import KEPT_SUFFIXES
from tests.helpers_unit import TINY_TOKENIZER, base_params, conv, png_bytes, write_params, write_png


# --- outcomes and cases -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rejected:
    reason: str


@dataclass(frozen=True)
class Accepted:
    note: str | None = None


@dataclass(frozen=True)
class Flagged:
    """The data gate fails the expectation on `column` for exactly the bad record's row (the stage runs)."""

    column: str


@dataclass(frozen=True)
class Fails:
    error: type[BaseException]
    pattern: str


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    stage: str
    bad: object  # a record, a raw line, a file's bytes, or a function of the workspace (see the runners)
    outcome: Rejected | Accepted | Flagged | Fails
    options: dict = field(default_factory=dict)


def rec(rid: str = "bad", image: object = "src/images/ok.png", turns: list | None = None) -> dict:
    """A phase-2 record; `image=None` for text-only. Paths are relative to the image root (hdf5 stage)."""
    out: dict = {
        "id": rid,
        "conversations": turns if turns is not None else conv("What color?", "red", image=image is not None),
    }
    if image is not None:
        out["image"] = image
    return out


def turn(frm: str, value: object) -> dict:
    return {"from": frm, "value": value}


LONG = " ".join(["circle"] * 400)  # well past the tiny preset's MSL in tokens


# The images every workspace holds under data/raw/src/images/ (the source folder), and what sits outside the
# image root: a PNG and a folder that the links point to.
def _images(raw_src: Path, outside: Path) -> None:
    img = raw_src / "images"
    write_png(img / "ok.png", (64, 64))
    (img / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (img / "empty.png").write_bytes(b"")
    Image.new("L", (20, 12), 90).save(img / "gif.jpg", format="GIF")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(img / "anim.jpg", format="GIF", save_all=True, append_images=frames[1:])
    write_png(outside / "secret.png", (64, 64))
    (img / "link.png").symlink_to(outside / "secret.png")
    (img / "linkdir").symlink_to(outside, target_is_directory=True)


# --- hdf5: a line appended to a phase's jsonl, or a change to the workspace ------------------------------------
HDF5 = [
    Case("json_list_line", "malformed jsonl", "hdf5", "[1, 2]", Rejected("malformed_record")),
    Case("json_null_line", "malformed jsonl", "hdf5", "null", Rejected("malformed_record")),
    Case(
        "conversations_a_string",
        "malformed jsonl",
        "hdf5",
        {"id": "b", "conversations": "hi"},
        Rejected("malformed_record"),
    ),
    Case(
        "turn_value_a_number",
        "malformed jsonl",
        "hdf5",
        rec(turns=[turn("human", 5), turn("gpt", "red")]),
        Rejected("malformed_turn"),
    ),
    Case(
        "turn_value_null",
        "malformed jsonl",
        "hdf5",
        rec(turns=[turn("human", None), turn("gpt", "red")]),
        Rejected("malformed_turn"),
    ),
    Case(
        "turn_without_from",
        "malformed jsonl",
        "hdf5",
        rec(turns=[{"value": "<image>\nQ?"}, turn("gpt", "red")]),
        Rejected("malformed_turn"),
    ),
    Case("no_turns", "malformed jsonl", "hdf5", rec(turns=[]), Rejected("empty_conversation")),
    Case(
        "last_line_cut",
        "truncated jsonl",
        "hdf5",
        lambda ws: ws.append(b'{"id": "cut", "conversations": [{"fr', newline=False),
        Rejected("malformed_record"),
    ),
    Case(
        "latin1_bytes_line",
        "non-UTF-8 text",
        "hdf5",
        b'{"id": "l1", "conversations": [{"from": "human", "value": "caf\xe9?"}, {"from": "gpt", "value": "a"}]}',
        Rejected("malformed_record"),
    ),
    Case(
        "lone_surrogate_text",
        "non-UTF-8 text",
        "hdf5",
        '{"id": "s", "conversations": [{"from": "human", "value": "q\\ud800"}, {"from": "gpt", "value": "a"}]}',
        Rejected("invalid_unicode"),
    ),
    Case(
        "lone_surrogate_image_path",
        "non-UTF-8 text",
        "hdf5",
        '{"id": "s", "image": "src/images/o\\udc80k.png", "conversations": [{"from": "human", "value": "<image>\\nq"}, '
        '{"from": "gpt", "value": "a"}]}',
        Rejected("invalid_unicode"),
    ),
    Case(
        "every_input_empty",
        "empty file",
        "hdf5",
        lambda ws: ws.empty_inputs(),
        Fails(ValueError, r"phase2: no example survived \(\{\}\) out of 0 records"),
    ),
    Case("garbage_image", "corrupt image", "hdf5", rec(image="src/images/garbage.png"), Rejected("image_undecodable")),
    Case("zero_byte_image", "corrupt image", "hdf5", rec(image="src/images/empty.png"), Rejected("image_undecodable")),
    Case(
        "animated_gif_named_jpg",
        "GIF named .jpg",
        "hdf5",
        rec(image="src/images/anim.jpg"),
        Accepted("animated_first_frame_used"),
    ),
    Case(
        "absolute_image_path",
        "absolute image path",
        "hdf5",
        lambda ws: ws.append(rec(image=str(ws.outside / "secret.png"))),
        Rejected("image_path_outside_root"),
    ),
    Case(
        "file_link_leaving_root",
        "link leaving the image root",
        "hdf5",
        rec(image="src/images/link.png"),
        Rejected("image_path_outside_root"),
    ),
    Case(
        "folder_link_leaving_root",
        "link leaving the image root",
        "hdf5",
        rec(image="src/images/linkdir/secret.png"),
        Rejected("image_path_outside_root"),
    ),
    Case(
        "three_turns",
        "odd number of turns",
        "hdf5",
        rec(turns=conv("What color?", "red", "And the shape?")),
        Rejected("odd_number_of_turns"),
    ),
    Case(
        "image_without_placeholder",
        "<image> count mismatch",
        "hdf5",
        rec(turns=conv("What color?", "red", image=False)),
        Rejected("image_placeholder_count"),
    ),
    Case(
        "placeholder_in_second_turn",
        "<image> count mismatch",
        "hdf5",
        rec(turns=conv("Hi?", "Hello.", image=False) + [turn("human", "<image>\nColor?"), turn("gpt", "red")]),
        Rejected("image_placeholder_count"),
    ),
    Case(
        "placeholder_in_answer",
        "<image> count mismatch",
        "hdf5",
        rec(turns=[turn("human", "What is it?"), turn("gpt", "<image> red")]),
        Rejected("image_placeholder_count"),
    ),
    Case(
        "placeholder_in_text_only",
        "<image> count mismatch",
        "hdf5",
        rec(image=None, turns=conv("What color?", "red")),
        Rejected("image_placeholder_without_image"),
    ),
    Case(
        "caption_longer_than_msl",
        "longer than MSL",
        "hdf5",
        {"id": "long", "image": "src/images/ok.png", "conversations": conv("", LONG)},
        Rejected("longer_than_msl"),
        {"phase": "phase1"},
    ),
    Case("image_a_list", "wrong field types", "hdf5", rec(image=["src/images/ok.png"]), Rejected("image_path_invalid")),
    Case("image_empty_string", "wrong field types", "hdf5", rec(image=""), Rejected("image_path_invalid")),
]


# --- validate: the data gate over the jsonl the writer read (the writer rejects the line, the gate names it) ----
VALIDATE = [
    Case(
        "latin1_bytes_line",
        "non-UTF-8 text",
        "validate",
        b'{"id": "l1", "conversations": [{"from": "human", "value": "caf\xe9?"}, {"from": "gpt", "value": "a"}]}',
        Flagged("parsed"),
    ),
    Case(
        "turn_value_a_number",
        "malformed jsonl",
        "validate",
        rec(turns=[turn("human", 5), turn("gpt", "red")]),
        Flagged("conversation_ok"),
    ),
    Case(
        "placeholder_in_second_turn",
        "<image> count mismatch",
        "validate",
        rec(turns=conv("Hi?", "Hello.", image=False) + [turn("human", "<image>\nColor?"), turn("gpt", "red")]),
        Flagged("placeholders_match_image"),
    ),
]


def _tokenizer_without(*keys: str) -> Callable:
    def change(ws) -> None:
        folder = ws.root / "tokenizer"
        shutil.copytree(TINY_TOKENIZER, folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        for k in keys:
            config.pop(k)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        ws.params["model"]["tokenizer"] = str(folder)

    return change


def _tokenizer_folder(files: dict[str, str]) -> Callable:
    def change(ws) -> None:
        folder = ws.root / "tokenizer"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        ws.params["model"]["tokenizer"] = str(folder)

    return change


TOKENIZERS = [
    Case(
        "tokenizer_without_bos",
        "tokenizer without its special tokens",
        "hdf5",
        _tokenizer_without("bos_token"),
        Fails(TokenizerError, r"lacks bos_token_id; a Llama-style BOS and EOS are required"),
    ),
    Case(
        "tokenizer_without_eos",
        "tokenizer without its special tokens",
        "hdf5",
        _tokenizer_without("eos_token"),
        Fails(TokenizerError, r"lacks eos_token_id"),
    ),
    Case(
        "tokenizer_without_pad_or_unk",
        "tokenizer without its special tokens",
        "hdf5",
        _tokenizer_without("pad_token", "unk_token"),
        Fails(TokenizerError, r"has neither a pad nor an unk token"),
    ),
    Case(
        "tokenizer_folder_empty",
        "tokenizer without its special tokens",
        "hdf5",
        _tokenizer_folder({}),
        Fails(TokenizerError, r"tokenizer '.*/tokenizer' cannot be loaded"),
    ),
    Case(
        "tokenizer_json_damaged",
        "tokenizer without its special tokens",
        "hdf5",
        _tokenizer_folder({"tokenizer.json": "{not json", "tokenizer_config.json": "{}"}),
        Fails(TokenizerError, r"tokenizer '.*/tokenizer' cannot be loaded: .*Error"),
    ),
]


# --- convert: a record appended to a LLaVA JSON array, or a whole source file ----------------------------------
@dataclass(frozen=True)
class SourceFile:
    name: str
    data: bytes
    converter: str = "llava_json"


def crec(rid: str = "bad", image: str | None = "images/ok.png", turns: list | None = None) -> dict:
    """A record as the source holds it (image path relative to the source folder)."""
    return rec(rid, image, turns)


def _arxivqa(*lines: bytes) -> SourceFile:
    good = json.dumps({"id": "g", "image": "images/ok.png", "question": "Q?", "options": ["a", "b"], "label": "A"})
    return SourceFile("qa.jsonl", b"\n".join([good.encode(), *lines]) + b"\n", "arxivqa")


CONVERT = [
    Case(
        "lone_surrogate",
        "non-UTF-8 text",
        "convert",
        json.loads(
            '{"id": "s", "conversations": [{"from": "human", "value": "q\\ud800"}, {"from": "gpt", "value": "a"}]}'
        ),
        Rejected("invalid_unicode"),
    ),
    Case(
        "utf16_json",
        "non-UTF-8 text",
        "convert",
        SourceFile("data.json", json.dumps([crec("g")]).encode("utf-16")),
        Fails(ValueError, r"data\.json: not UTF-8 text"),
    ),
    Case(
        "arxivqa_latin1",
        "non-UTF-8 text",
        "convert",
        _arxivqa(b'{"id": 2, "question": "caf\xe9"}'),
        Fails(ValueError, r"qa\.jsonl: not UTF-8 text"),
    ),
    Case(
        "utf8_with_bom",
        "non-UTF-8 text",
        "convert",
        SourceFile("data.json", b"\xef\xbb\xbf" + json.dumps([crec("g")]).encode()),
        Accepted(),
    ),
    Case("arxivqa_line_not_an_object", "malformed jsonl", "convert", _arxivqa(b"[1, 2]"), Rejected("not_an_object")),
    Case(
        "arxivqa_last_line_cut",
        "truncated jsonl",
        "convert",
        _arxivqa(b'{"id": 3, "image": "ima'),
        Rejected("invalid_json"),
    ),
    Case(
        "zero_byte_json",
        "empty file",
        "convert",
        SourceFile("data.json", b""),
        Fails(ValueError, r"data\.json: empty file"),
    ),
    Case(
        "empty_json_array",
        "empty file",
        "convert",
        SourceFile("data.json", b"[]"),
        Fails(ValueError, r"data\.json: no records found"),
    ),
    Case(
        "zero_byte_parquet",
        "empty file",
        "convert",
        SourceFile("x.parquet", b"", "synthdog"),
        Fails(ValueError, r"x\.parquet: empty file"),
    ),
    Case(
        "garbage_parquet",
        "damaged archive or data file",
        "convert",
        SourceFile("x.parquet", b"PAR1" + bytes(64) + b"PAR1", "synthdog"),
        Fails(ValueError, r"x\.parquet: not a readable parquet file"),
    ),
    Case("garbage_image", "corrupt image", "convert", crec(image="images/garbage.png"), Rejected("image_undecodable")),
    Case("zero_byte_image", "corrupt image", "convert", crec(image="images/empty.png"), Rejected("image_undecodable")),
    Case("gif_named_jpg", "GIF named .jpg", "convert", crec(image="images/gif.jpg"), Accepted()),
    Case(
        "file_link_leaving_root",
        "link leaving the image root",
        "convert",
        crec(image="images/link.png"),
        Rejected("image_path_outside_root"),
    ),
    Case(
        "folder_link_leaving_root",
        "link leaving the image root",
        "convert",
        crec(image="images/linkdir/secret.png"),
        Rejected("image_path_outside_root"),
    ),
]


# --- download: an archive in a local source with extract: true ---------------------------------------------
def zip_with(*members: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def tar_with(*members: tarfile.TarInfo, gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"fine"))
        for m in members:
            tf.addfile(m)
    return buf.getvalue()


def tar_member(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, link
    return m


def truncated_tgz() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = bytes(range(256)) * 400
        big = tarfile.TarInfo("big.bin")
        big.size = len(data)
        tf.addfile(big, io.BytesIO(data))
    return buf.getvalue()[:200]


def zip_bad_crc() -> bytes:
    data = bytearray(zip_with(("images/a.png", png_bytes())))
    at = data.index(b"IEND")  # a byte inside the stored PNG (zipfile stores, it does not deflate, by default)
    data[at] ^= 0xFF
    return bytes(data)


ABSOLUTE = "/tmp/llava-reliability-evil.txt"  # refused before anything is written: checked to stay absent
DOWNLOAD = [
    Case(
        "zip_absolute_member",
        "unsafe archive entry",
        "download",
        ("pack.zip", zip_with((ABSOLUTE, b"evil"))),
        Fails(
            UnsafeArchiveError,
            r"pack\.zip: refused, member '/tmp/llava-reliability-evil\.txt' would be written outside",
        ),
    ),
    Case(
        "zip_drive_letter_member",
        "unsafe archive entry",
        "download",
        ("pack.zip", zip_with(("C:\\evil.txt", b"evil"))),
        Fails(UnsafeArchiveError, r"member 'C:\\\\evil\.txt' would be written outside"),
    ),
    Case(
        "zip_backslash_parent_member",
        "unsafe archive entry",
        "download",
        ("pack.zip", zip_with(("..\\evil.txt", b"evil"))),
        Fails(UnsafeArchiveError, r"member '\.\.\\\\evil\.txt' would be written outside"),
    ),
    Case(
        "tar_fifo",
        "unsafe archive entry",
        "download",
        ("pack.tar.gz", tar_with(tar_member("pipe", tarfile.FIFOTYPE))),
        Fails(UnsafeArchiveError, r"pack\.tar\.gz: refused, member 'pipe' is a special file"),
    ),
    Case(
        "tar_block_device",
        "unsafe archive entry",
        "download",
        ("pack.tgz", tar_with(tar_member("sda", tarfile.BLKTYPE))),
        Fails(UnsafeArchiveError, r"member 'sda' is a special file"),
    ),
    Case(
        "tar_absolute_hard_link",
        "unsafe archive entry",
        "download",
        ("pack.tar", tar_with(tar_member("passwd", tarfile.LNKTYPE, "/etc/passwd"), gz=False)),
        Fails(UnsafeArchiveError, r"member 'passwd' is a link to the absolute path '/etc/passwd'"),
    ),
    Case(
        "truncated_tar_gz",
        "damaged archive or data file",
        "download",
        ("pack.tar.gz", truncated_tgz()),
        Fails(CorruptArchiveError, r"pack\.tar\.gz: damaged or truncated archive"),
    ),
    Case(
        "garbage_zip",
        "damaged archive or data file",
        "download",
        ("pack.zip", b"PK\x03\x04" + bytes(100)),
        Fails(CorruptArchiveError, r"pack\.zip: damaged or truncated archive \(BadZipFile"),
    ),
    Case(
        "zero_byte_zip",
        "damaged archive or data file",
        "download",
        ("pack.zip", b""),
        Fails(CorruptArchiveError, r"pack\.zip: damaged or truncated archive"),
    ),
    Case(
        "zip_member_bad_crc",
        "damaged archive or data file",
        "download",
        ("pack.zip", zip_bad_crc()),
        Fails(CorruptArchiveError, r"pack\.zip: damaged or truncated archive \(BadZipFile: Bad CRC-32"),
    ),
]


# --- evaluate: the question file ------------------------------------------------------------------------------
def question(qid: int = 7, **fields) -> dict:
    return {"question_id": qid, "image": "images/ok.png", "text": "What color?", "answers": ["red"], **fields}


def qlines(*lines: bytes | dict) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in (question(1), *lines))


EVALUATE = [
    Case(
        "questions_latin1",
        "non-UTF-8 text",
        "evaluate",
        qlines(b'{"question_id": 2, "text": "caf\xe9"}'),
        Fails(ValueError, r"questions\.jsonl:2: not UTF-8 text"),
    ),
    Case(
        "question_lone_surrogate",
        "non-UTF-8 text",
        "evaluate",
        qlines(b'{"question_id": 2, "image": "images/ok.png", "text": "q\\ud800", "answers": ["a"]}'),
        Fails(ValueError, r"questions\.jsonl:2: the question text is not a valid string"),
    ),
    Case(
        "questions_line_cut",
        "truncated jsonl",
        "evaluate",
        qlines(b'{"question_id": 2, "ima'),
        Fails(ValueError, r"questions\.jsonl:2: not valid JSON"),
    ),
    Case(
        "question_a_list",
        "malformed jsonl",
        "evaluate",
        qlines(b"[1, 2]"),
        Fails(ValueError, r"questions\.jsonl:2: expected a JSON object, got list"),
    ),
    Case(
        "question_without_answers",
        "malformed jsonl",
        "evaluate",
        qlines({"question_id": 2, "image": "images/ok.png", "text": "q"}),
        Fails(ValueError, r"questions\.jsonl:2: question lacks \['answers'\]"),
    ),
    Case("questions_empty", "empty file", "evaluate", b"", Fails(ValueError, r"questions\.jsonl: no questions")),
    Case(
        "question_image_missing",
        "missing image",
        "evaluate",
        qlines(question(2, image="images/gone.png")),
        Fails(ValueError, r"question 2: unusable image \(image_missing: images/gone\.png"),
    ),
    Case(
        "question_image_parent_path",
        "`..` in image path",
        "evaluate",
        qlines(question(2, image="../../secret.png")),
        Fails(ValueError, r"question 2: unusable image \(image_path_outside_root: \.\./\.\./secret\.png"),
    ),
]

# --- config: the params file ------------------------------------------------------------------------------------
CONFIG = [
    Case(
        "params_not_yaml",
        "malformed params file",
        "config",
        b"preset: tiny\nseed: [0\n",
        Fails(ConfigError, r"params\.yaml: not valid YAML"),
    ),
    Case(
        "params_latin1",
        "malformed params file",
        "config",
        b"preset: tiny # caf\xe9\n",
        Fails(ConfigError, r"params\.yaml: not UTF-8 text"),
    ),
    Case(
        "params_a_list",
        "malformed params file",
        "config",
        b"- preset\n- tiny\n",
        Fails(ConfigError, r"params\.yaml: expected a mapping of settings at the top level, got list"),
    ),
]

CASES = [*HDF5, *TOKENIZERS, *VALIDATE, *CONVERT, *DOWNLOAD, *EVALUATE, *CONFIG]

# Bad inputs the per-stage tests already try (kind, test): not repeated in the corpus, counted in its figures.
ELSEWHERE = [
    *[("malformed jsonl", "tests/data/test_convert.py::test_each_drop_reason_is_counted")] * 7,  # not objects, fields
    ("malformed jsonl", "tests/data/test_convert.py::test_json_not_an_array"),
    (
        "malformed jsonl",
        "tests/data/test_hdf5.py::test_nothing_surviving_is_an_error_naming_the_reasons_and_leaves_nothing",
    ),
    ("truncated jsonl", "tests/data/test_convert.py::test_invalid_json_names_the_file"),
    ("truncated jsonl", "tests/data/test_hdf5.py::test_rejections_are_counted_by_reason"),
    ("non-UTF-8 text", "tests/data/test_convert.py::test_not_utf8_names_the_file"),
    ("missing image", "tests/data/test_convert.py::test_each_drop_reason_is_counted"),
    ("missing image", "tests/data/test_hdf5.py::test_rejections_are_counted_by_reason"),
    ("missing image", "tests/data/test_images.py::test_missing_image"),
    ("truncated image", "tests/data/test_convert.py::test_each_drop_reason_is_counted"),
    ("truncated image", "tests/data/test_hdf5.py::test_rejections_are_counted_by_reason"),
    ("truncated image", "tests/data/test_images.py::test_truncated_png_is_undecodable"),
    ("corrupt image", "tests/data/test_images.py::test_garbage_file_is_undecodable"),
    ("corrupt image", "tests/data/test_images.py::test_decompression_bomb_is_rejected"),
    ("corrupt image", "tests/data/test_images.py::test_too_small_image"),
    ("GIF named .jpg", "tests/data/test_hdf5.py::test_rejections_are_counted_by_reason"),
    ("GIF named .jpg", "tests/data/test_images.py::test_gif_named_jpg_decodes"),
    *[("`..` in image path", "tests/data/test_convert.py::test_each_drop_reason_is_counted")] * 2,
    ("`..` in image path", "tests/data/test_hdf5.py::test_rejections_are_counted_by_reason"),
    *[("`..` in image path", "tests/data/test_images.py::test_resolve_rejects_paths_leaving_root")] * 2,
    *[("absolute image path", "tests/data/test_convert.py::test_absolute_image_path_is_rejected")] * 2,
    ("absolute image path", "tests/data/test_convert.py::test_absolute_path_rejected_without_prefix"),
    *[("absolute image path", "tests/data/test_images.py::test_resolve_rejects_paths_leaving_root")] * 2,
    ("link leaving the image root", "tests/data/test_images.py::test_resolve_rejects_symlink_leaving_root"),
    *[("unsafe archive entry", "tests/data/test_download_remote.py::test_unsafe_tar_members_are_refused")] * 6,
    ("unsafe archive entry", "tests/data/test_download_remote.py::test_http_zip_with_parent_entry_is_refused"),
    ("unsafe archive entry", "tests/data/test_download_remote.py::test_zip_symlink_leaving_folder_is_refused"),
    ("odd number of turns", "tests/data/test_convert.py::test_each_drop_reason_is_counted"),
    ("odd number of turns", "tests/data/test_hdf5.py::test_rejections_are_counted_by_reason"),
    *[("<image> count mismatch", "tests/data/test_convert.py::test_each_drop_reason_is_counted")] * 4,
    ("<image> count mismatch", "tests/data/test_hdf5.py::test_rejections_are_counted_by_reason"),
    ("longer than MSL", "tests/data/test_hdf5.py::test_rejections_are_counted_by_reason"),
    *[("wrong field types", "tests/data/test_convert.py::test_each_drop_reason_is_counted")] * 2,
    *[("wrong field types", "tests/data/test_images.py::test_resolve_rejects_empty")] * 2,
]


def figures() -> dict:
    """What docs/reliability.md quotes: bad inputs tried, of how many kinds."""
    kinds = {c.kind for c in CASES} | {k for k, _ in ELSEWHERE}
    return {
        "corpus_cases": len(CASES),
        "elsewhere_cases": len(ELSEWHERE),
        "bad_inputs": len(CASES) + len(ELSEWHERE),
        "kinds": len(kinds),
        "by_kind": dict(sorted(Counter([c.kind for c in CASES] + [k for k, _ in ELSEWHERE]).items())),
    }


# --- the workspaces ----------------------------------------------------------------------------------------
HDF5_GOOD = {"phase1": [rec("g1", turns=conv("", "A red circle."))], "phase2": [rec("g1"), rec("g2", image=None)]}


class Workspace:
    """A tiny workspace: the images above, and per stage its good inputs (a bad one is added by the case)."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "ws"
        self.outside = tmp_path / "outside"
        self.raw_src = self.root / "data" / "raw" / "src"
        self.params = base_params(self.root)
        self.params["sources"]["src"] = {"kind": "local", "location": str(tmp_path / "origin")}
        _images(self.raw_src, self.outside)
        self.phase = "phase2"
        self.lines = {phase: [json.dumps(r).encode() for r in recs] for phase, recs in HDF5_GOOD.items()}
        self.final_newline = True

    def config(self):
        return load_config(write_params(self.root.parent, self.params))

    def append(self, item: object, newline: bool = True) -> None:
        """A line for the phase's jsonl: bytes as they are, a str (JSON text, escapes kept), or a record."""
        text = item if isinstance(item, bytes | str) else json.dumps(item)
        self.lines[self.phase].append(text if isinstance(text, bytes) else text.encode())
        self.final_newline = newline

    def empty_inputs(self) -> None:
        self.lines = {"phase1": [], "phase2": []}

    def write_jsonl(self, cfg) -> None:
        for phase, dataset in (("phase1", "shapes_pretrain"), ("phase2", "shapes_instruct")):
            path = cfg.jsonl_path(dataset)
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = self.lines[phase]
            end = b"\n" if lines and (self.final_newline or phase != self.phase) else b""
            path.write_bytes(b"\n".join(lines) + end)


def _check_no_temporaries(folder: Path) -> None:
    """No hidden temporaries beside the final path; a download's work folder (`.<source>.work`, what a failed
    transfer resumes from) is meant to stay."""
    if folder.is_dir():
        left = [p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(KEPT_SUFFIXES)]
        assert not left, f"temporary files left in {folder}: {left}"


def _expect(outcome, run: Callable, final: Path):
    """Run the stage; check a `Fails` outcome here (raised, named, nothing at `final`); return the result."""
    if isinstance(outcome, Fails):
        with pytest.raises(outcome.error, match=outcome.pattern):
            run()
        assert not final.exists(), f"{final} exists after a failed run"
        _check_no_temporaries(final.parent)
        return None
    result = run()
    assert final.exists()
    _check_no_temporaries(final.parent)
    return result


def run_hdf5(tmp_path: Path, case: Case) -> None:
    ws = Workspace(tmp_path)
    ws.phase = case.options.get("phase", "phase2")
    case.bad(ws) if callable(case.bad) else ws.append(case.bad)
    cfg = ws.config()
    ws.write_jsonl(cfg)
    result = _expect(case.outcome, lambda: build_hdf5(cfg, ws.phase), cfg.hdf5_dir(ws.phase))
    if result is None:
        return
    params = json.loads((result.path / "data_params.json").read_text())
    good = len(HDF5_GOOD[ws.phase])
    if isinstance(case.outcome, Rejected):
        assert params["discarded_by_reason"] == {case.outcome.reason: 1}
        assert params["examples"] == good and params["processed"] == good + 1
    else:
        assert params["discarded_by_reason"] == {} and params["examples"] == good + 1
        if case.outcome.note:
            assert params["image_notes"].get(case.outcome.note) == 1, params["image_notes"]


def run_validate(tmp_path: Path, case: Case) -> None:
    from llava_core.data.validate import validate_phase

    ws = Workspace(tmp_path)
    ws.append(case.bad)
    cfg = ws.config()
    ws.write_jsonl(cfg)
    build_hdf5(cfg, "phase2")
    result = validate_phase(cfg, "phase2")
    failed = {e["kwargs"].get("column"): e for e in result.suites["jsonl"].expectations if not e["success"]}
    row = f"shapes_instruct.jsonl:{len(HDF5_GOOD['phase2']) + 1}"
    assert failed[case.outcome.column]["examples"] == [row] and failed[case.outcome.column]["unexpected_count"] == 1
    assert not result.success and result.path.is_file()


def run_convert(tmp_path: Path, case: Case) -> None:
    ws = Workspace(tmp_path)
    good = [crec("g1"), crec("g2", image=None)]
    if isinstance(case.bad, SourceFile):
        file, converter, data = case.bad.name, case.bad.converter, case.bad.data
    else:
        file, converter = "data.json", "llava_json"
        data = json.dumps([*good, case.bad]).encode()  # ASCII: a lone surrogate stays a `\\ud800` escape
    ws.params["datasets"] = {"d": {"source": "src", "file": file, "converter": converter, "phase": "phase2"}}
    (ws.raw_src / file).write_bytes(data)
    cfg = ws.config()
    result = _expect(case.outcome, lambda: convert(cfg, "d"), cfg.jsonl_path("d"))
    if result is None:
        return
    report = json.loads(result.report_path.read_text())
    written = [json.loads(line) for line in result.path.read_text(encoding="utf-8").splitlines()]
    kept = len(written)
    if isinstance(case.outcome, Rejected):
        assert report["dropped"] == {case.outcome.reason: 1}
        assert report["read"] == kept + 1 and "bad" not in {r["id"] for r in written}
    else:
        assert report["dropped"] == {} and report["read"] == kept


def run_download(tmp_path: Path, case: Case) -> None:
    ws = Workspace(tmp_path)
    name, data = case.bad
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / name).write_bytes(data)
    ws.params["sources"]["src"]["extract"] = True
    cfg = ws.config()
    shutil.rmtree(cfg.raw_dir("src"))  # the workspace's images are not needed: the source folder is the output
    _expect(case.outcome, lambda: download(cfg, "src"), cfg.raw_dir("src"))
    assert not Path(ABSOLUTE).exists()
    assert not [p for p in tmp_path.rglob("*evil*")], "an unsafe member was written"
    assert not cfg.raw_dir("src").with_name(".src.partial").exists()


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory) -> Path:
    """A converted HF model (random tiny weights) that every evaluate case reads."""
    from llava_core.data.tokenizer import load_tokenizer
    from llava_core.model.hf import export_hf
    from tests.helpers_models import write_checkpoint

    root = tmp_path_factory.mktemp("model")
    cfg = load_config(write_params(root, base_params(root)))
    write_checkpoint(cfg, load_tokenizer(cfg.resolve_file(cfg.model.tokenizer)))
    return export_hf(cfg).path.parent


def run_evaluate(tmp_path: Path, case: Case, models: Path) -> None:
    from llava_core.evaluation.evaluate import evaluate

    ws = Workspace(tmp_path)
    ws.params["workspace"]["models"] = str(models)
    ws.params["eval"].update(questions="src/questions.jsonl", image_folder="src")
    (ws.raw_src / "questions.jsonl").write_bytes(case.bad)
    cfg = ws.config()
    _expect(case.outcome, lambda: evaluate(cfg), cfg.path("reports") / "eval.json")
    assert not (cfg.path("reports") / "answers.jsonl").exists()


def run_config(tmp_path: Path, case: Case) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(case.bad)
    with pytest.raises(case.outcome.error, match=case.outcome.pattern):
        load_config(path)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.stage}-{c.name}" for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, request) -> None:
    if case.stage == "evaluate":
        run_evaluate(tmp_path, case, request.getfixturevalue("exported_model"))
    else:
        runners = {"hdf5": run_hdf5, "validate": run_validate, "convert": run_convert, "download": run_download}
        runners.get(case.stage, run_config)(tmp_path, case)


def test_the_corpus_names_only_tests_that_exist():
    from tests.helpers_unit import PROJECT

    for _, test in ELSEWHERE:
        path, name = test.split("::")
        assert f"def {name}(" in (PROJECT / path).read_text(), test
    assert len({(c.stage, c.name) for c in CASES}) == len(CASES)  # the test ids are unique


def test_the_reliability_page_quotes_the_corpus_figures():
    from tests.helpers_unit import PROJECT

    f = figures()
    text = f"{f['bad_inputs']} bad inputs of {f['kinds']} kinds: {f['corpus_cases']} in the corpus"
    assert text in (PROJECT / "docs" / "reliability.md").read_text(), text


if __name__ == "__main__":
    print(json.dumps(figures(), indent=2))
