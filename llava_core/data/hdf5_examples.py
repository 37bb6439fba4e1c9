"""The HDF5 writer's unit of work: a range of jsonl lines -> checked, tokenised, packed examples in one file.

A `TaskRunner` runs in the writer's process or in a worker process (`hdf5_writer`); it needs only the
`tokenizers` backend, h5py and Pillow, never torch or transformers. Its examples file keeps the input order;
the writer's shuffle step then reads rows from any of them (docs/formats.md has the layout of a row).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from llava_core.data.hdf5_format import NO_IMAGE, STRING
from llava_core.data.images import ImageChecker, ImageRejected
from llava_core.data.prompts import (
    PromptError,
    Segments,
    backend_encoder,
    batch_encoder,
    conversation_segments,
    encode_segments_batch,
    placeholder_problem,
    suffix_name,
    text_is_valid_unicode,
)


def example_rows(
    enc_ids: list[int], enc_loss: list[int], msl: int, pad_id: int, image_start: int, num_patches: int, has_image: bool
) -> np.ndarray:
    """Pack one encoded conversation into the (4, MSL) int32 block."""
    return pack_examples([(enc_ids, enc_loss, has_image)], msl, pad_id, image_start, num_patches)[0]


def pack_examples(
    examples: list[tuple[list[int], list[int], bool]], msl: int, pad_id: int, image_start: int, num_patches: int
) -> np.ndarray:
    """(tokens, loss, has_image) of encoded conversations (each at most MSL long) -> int32 (N, 4, MSL).

    Cerebras' construction: `input_ids = tokens[:-1]`, `labels = tokens[1:]`, the loss mask of each label, and
    key_padding_mask 1 from the end of the inputs (the final `</s>` is a label, never an input).
    """
    n = len(examples)
    data = np.zeros((n, 4, msl), dtype=np.int32)
    ids, loss, labels = data[:, 0], data[:, 1], data[:, 2]
    ids[:] = pad_id
    labels[:] = pad_id
    lengths = np.empty(n, dtype=np.int64)
    for k, (tokens, enc_loss, _) in enumerate(examples):
        m = len(tokens) - 1
        lengths[k] = m
        ids[k, :m] = tokens[:-1]
        labels[k, :m] = tokens[1:]
        loss[k, :m] = enc_loss[1:]
    data[:, 3] = np.arange(msl)[None, :] >= lengths[:, None]  # 1 after the inputs
    text_only = np.array([not has_image for _, _, has_image in examples], dtype=bool)
    data[text_only, 3, image_start : image_start + num_patches] = 1  # text-only: the slots are not attended
    return data


# --- the writer's tasks (run in this process or in worker processes) --------------------------------------


@dataclass(frozen=True)
class WriterSpec:
    """Everything a writer process needs: plain values only (sent to `spawn`ed workers)."""

    phase: str
    requires_image: bool
    style: str
    msl: int
    num_patches: int
    pad_id: int
    bos_id: int
    eos_id: int
    min_image_size: int
    image_root: str
    tokenizer_json: str | None  # the fast tokenizer's serialised pipeline (workers need no transformers)
    tokenizer_path: str  # used when the tokenizer has no fast (Rust) pipeline


@dataclass
class TaskResult:
    """One task's examples file and its counts; summed by the parent."""

    task: int
    file: str | None
    examples: int = 0
    processed: int = 0
    discarded: Counter = field(default_factory=Counter)
    image_notes: Counter = field(default_factory=Counter)
    image_starts: set = field(default_factory=set)
    text_only: int = 0
    non_pad_tokens: int = 0
    loss_valid_tokens: int = 0
    max_token_id: int = -1
    min_length: int = 0
    max_length: int = 0
    sum_length: int = 0
    suffixes: Counter = field(default_factory=Counter)  # human turns of the examples by the suffix they end with


class TaskRunner:
    """Turns a range of jsonl lines into an examples file: checks, batched tokenisation, packing."""

    def __init__(self, spec: WriterSpec) -> None:
        self.spec = spec
        self.images = ImageChecker(Path(spec.image_root), spec.min_image_size)
        if spec.tokenizer_json is not None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(spec.tokenizer_json)
            self.encode_batch = backend_encoder(backend)
            self.eos_text = backend.id_to_token(spec.eos_id)
        else:
            from llava_core.data.tokenizer import load_tokenizer

            tok = load_tokenizer(spec.tokenizer_path)
            self.encode_batch = batch_encoder(tok)
            self.eos_text = tok.eos_token

    def _record(self, line: bytes, res: TaskResult) -> tuple[Segments, str | None, list[str]] | None:
        """Parse and check one record, its image aside: (segments, image path or None, the suffix name each human
        turn ends with); None (with the reason counted) when it is rejected."""
        s = self.spec
        try:
            rec = json.loads(line)
            conv = rec["conversations"]
            if not isinstance(conv, list):
                raise TypeError
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            res.discarded["malformed_record"] += 1
            return None
        if b"\\u" in line and b"\\ud" in line.lower() and not text_is_valid_unicode(rec):  # a lone surrogate
            res.discarded["invalid_unicode"] += 1
            return None
        image = rec.get("image")
        try:  # the cheap checks first: a record rejected here never has its image decoded
            segments = conversation_segments(conv, s.style, eos_text=self.eos_text)
        except PromptError as e:
            res.discarded[e.reason] += 1
            return None
        problem = placeholder_problem(conv, image is not None)
        if problem is None and s.requires_image and image is None:
            problem = f"{s.phase}_without_image"
        if problem is not None:
            res.discarded[problem] += 1
            return None
        return segments, image, [suffix_name(t["value"]) for t in conv[::2]]

    def _check_images(self, images: list) -> list:
        """ImageInfo or ImageRejected for each path (runs in a thread: PIL decodes without the GIL)."""
        out = []
        for image in images:
            try:
                out.append(self.images.check(image))
            except ImageRejected as e:
                out.append(e)
        return out

    def run(self, task: int, source: str, start: int, end: int, out: str) -> TaskResult:
        s = self.spec
        res = TaskResult(task, None)
        parsed: list[tuple[Segments, str | None, list[str]]] = []
        with open(source, "rb") as f:
            f.seek(start)
            chunk = f.read(end - start)
        for raw in chunk.split(b"\n"):  # the lines `line_ranges` counted (json strings may hold U+2028)
            if not raw.strip():
                continue
            res.processed += 1
            r = self._record(raw, res)
            if r is not None:
                parsed.append(r)
        # The images are checked (full decode) in a thread while the tokenizer's Rust backend, which releases the
        # GIL, encodes every conversation; a record whose image is rejected is then dropped with its tokens.
        with ThreadPoolExecutor(1, thread_name_prefix="image-checks") as checker:
            checks = checker.submit(self._check_images, [image for _, image, _ in parsed if image is not None])
            segments = [seg for seg, _, _ in parsed]
            encoded = encode_segments_batch(segments, self.encode_batch, s.bos_id, s.eos_id, s.num_patches, s.pad_id)
            infos = iter(checks.result())
        rows, paths = [], []
        for (_, image, suffixes), enc in zip(parsed, encoded, strict=True):
            if image is not None:
                info = next(infos)
                if isinstance(info, ImageRejected):
                    res.discarded[info.reason] += 1
                    continue
                res.image_notes.update(info.notes)
            if len(enc.input_ids) > s.msl:
                res.discarded["longer_than_msl"] += 1
                continue
            if sum(enc.loss_mask) == 0:
                res.discarded["no_loss_tokens"] += 1
                continue
            res.image_starts.add(enc.image_start)
            res.suffixes.update(suffixes)
            rows.append((enc.input_ids, enc.loss_mask, image is not None))
            paths.append(image.encode("utf-8") if image is not None else NO_IMAGE)
        if not rows:
            return res
        if len(res.image_starts) != 1:  # packing needs one start; the parent reports several as an error
            return res
        data = pack_examples(rows, s.msl, s.pad_id, next(iter(res.image_starts)), s.num_patches)
        lengths = np.array([len(r[0]) - 1 for r in rows])  # the inputs of each row (its tokens but the last)
        res.examples = len(rows)
        res.text_only = sum(p == NO_IMAGE for p in paths)
        res.non_pad_tokens = int((data[:, 3] == 0).sum())
        res.loss_valid_tokens = int(data[:, 1].sum())
        res.max_token_id = int(data[:, 0].max())
        res.min_length, res.max_length, res.sum_length = int(lengths.min()), int(lengths.max()), int(lengths.sum())
        with h5_file(out) as h5:  # contiguous: the shuffle step reads rows in any order
            h5.attrs["n_examples"] = len(rows)
            h5.create_dataset("data", data=data)
            h5.create_dataset("img_path", data=np.array([[p] for p in paths], dtype=object), dtype=STRING)
        res.file = out
        return res


@contextmanager
def h5_file(path: str) -> Iterator[h5py.File]:
    """A new HDF5 file built in memory, then written to `path` by Python in one call.

    HDF5's own writes on a full disk do not fail cleanly: a chunked dataset's write error is swallowed when the
    file closes (a truncated file and no exception) or crashes the process. Python's write raises ENOSPC. The
    bytes equal those of a file written directly.
    """
    with h5py.File(f"{path}.mem", "w", driver="core", backing_store=False) as h5:
        yield h5
        h5.flush()
        image = h5.id.get_file_image()
    with open(path, "wb") as f:
        f.write(image)
