"""The HDF5 writer's unit of work: a range of jsonl lines -> checked, tokenised, packed examples in a spool.

A `TaskRunner` runs in the writer's process or in a worker process (`hdf5_writer`); it needs only the
`tokenizers` backend, h5py and Pillow, never torch or transformers. It appends each task's examples, in input
order, to its process's spool (`hdf5_shuffle`); the writer's shuffle step then reads rows from every spool
(docs/formats.md has the layout of a row).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llava_core.data.hdf5_format import NO_IMAGE
from llava_core.data.hdf5_shuffle import Spool
from llava_core.data.image_cache import ImageCheckCache
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
    image_cache: str | None = None  # the image checks' cache folder (llava_core/data/image_cache.py); None: off


@dataclass
class TaskResult:
    """One task's examples (where they sit in its process's spool) and its counts; summed by the parent."""

    task: int
    spool: str | None
    first_row: int = 0
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
    images_checked: int = 0
    images_decoded: int = 0  # image files decoded (the others' verdicts came from the cache)


@dataclass
class _Prepared:
    """A task's records parsed and checked (images aside)."""

    res: TaskResult
    work: str
    parsed: list[tuple[Segments, str | None, list[str]]]


class TaskRunner:
    """Turns ranges of jsonl lines into examples in this process's spool: checks, batched tokenisation, packing.

    `run_all` overlaps the steps of consecutive tasks: while one task's conversations are encoded in a thread
    (most of it the tokenizer's Rust code, which releases the GIL), this thread parses the next task and packs the
    previous one, and a third thread checks the images (Pillow decodes and hashlib hashes without the GIL)."""

    def __init__(self, spec: WriterSpec) -> None:
        self.spec = spec
        cache = ImageCheckCache(Path(spec.image_cache)) if spec.image_cache else None
        self.images = ImageChecker(Path(spec.image_root), spec.min_image_size, cache)
        self.spool: Spool | None = None
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

    def prepare(self, task: int, source: str, start: int, end: int, work: str) -> _Prepared:
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
        return _Prepared(res, work, parsed)

    def run_all(self, tasks: Iterable[tuple]) -> Iterator[TaskResult]:
        """Each task's result, in order; one task is encoded while the one before it is finished."""
        with (
            ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as tokenizer,
            ThreadPoolExecutor(1, thread_name_prefix="image-checks") as checker,
        ):
            ahead: deque = deque()
            for task in tasks:
                p = self.prepare(*task)
                images = [image for _, image, _ in p.parsed if image is not None]
                ahead.append((p, tokenizer.submit(self._encode, p), checker.submit(self._checks, images)))
                if len(ahead) > 1:
                    yield self.finish(*ahead.popleft())
            while ahead:
                yield self.finish(*ahead.popleft())

    def _encode(self, p: _Prepared) -> list:
        s = self.spec
        segments = [seg for seg, _, _ in p.parsed]
        return encode_segments_batch(segments, self.encode_batch, s.bos_id, s.eos_id, s.num_patches, s.pad_id)

    def _checks(self, images: list[str]) -> tuple[list, int]:
        before = self.images.decoded
        return self.images.check_many(images), self.images.decoded - before

    def finish(self, p: _Prepared, encoded: Future, checked: Future) -> TaskResult:
        """Assemble the encoded conversations, drop the rejected ones (counted), pack and spool the rest."""
        s, res = self.spec, p.res
        conversations = encoded.result()
        checks, res.images_decoded = checked.result()
        res.images_checked = len(checks)
        infos = iter(checks)
        rows, paths = [], []
        for (_, image, suffixes), enc in zip(p.parsed, conversations, strict=True):
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
        if rows and len(res.image_starts) == 1:  # packing needs one start; the parent reports several as an error
            self._spool_rows(res, rows, paths, p.work)
        return res

    def _spool_rows(self, res: TaskResult, rows: list, paths: list[bytes], work: str) -> None:
        s = self.spec
        data = pack_examples(rows, s.msl, s.pad_id, next(iter(res.image_starts)), s.num_patches)
        lengths = np.array([len(r[0]) - 1 for r in rows])  # the inputs of each row (its tokens but the last)
        res.examples = len(rows)
        res.text_only = sum(p == NO_IMAGE for p in paths)
        res.non_pad_tokens = int((data[:, 3] == 0).sum())
        res.loss_valid_tokens = int(data[:, 1].sum())
        res.max_token_id = int(data[:, 0].max())
        res.min_length, res.max_length, res.sum_length = int(lengths.min()), int(lengths.max()), int(lengths.sum())
        if self.spool is None or not self.spool.name.startswith(work):  # one spool per process and run
            self.spool = Spool(Path(work), s.msl)
        res.first_row = self.spool.append(data, paths)
        res.spool = self.spool.name

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
        if self.images.cache is not None:
            self.images.cache.close()


# --- worker processes (the writer's pool; this module only: a worker imports no config, no transformers) --
_RUNNER: TaskRunner | None = None  # one per worker process


def _die_with_parent(parent: int) -> None:
    """A worker exits as soon as the writer that started it dies, killed or not: it must never write on into a
    work folder that the next run (or a test's cleanup) is removing. On Linux the kernel sends SIGKILL at once
    (PR_SET_PDEATHSIG); elsewhere, and as a fallback, a thread looks at the parent every 0.2 s."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def init_worker(spec: WriterSpec, parent: int) -> None:
    """A writer worker process's start: one core for the tokenizer, exit with the parent, one runner."""
    global _RUNNER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _die_with_parent(parent)
    _RUNNER = TaskRunner(spec)


def run_task(args: tuple) -> TaskResult:
    """One task in a worker process (`TaskRunner.run_all` of one task: its images checked while it encodes)."""
    assert _RUNNER is not None
    (result,) = _RUNNER.run_all([args])
    return result
