"""Stage 3, HDF5: tokenised LLaVA examples with image slots and loss masks (REFERENCE.md section 6).

Layout (Cerebras ModelZoo compatible): files `data-<chunk>.h5`, each with attribute `n_examples`, a dataset
`data` int32 (N, 4, MSL) whose rows are input_ids, loss_mask, labels (= input_ids shifted left by one) and
key_padding_mask (1 = do not attend), chunked (1, 4, MSL), and `img_path` (N, 1) bytes relative to the
image root (b"None" for text-only samples). `data_params.json` records settings, counts and statistics.

The loss mask is aligned with `labels`: position t is supervised when labels[t] is an answer token (or the
`</s>` closing an answer).

Two steps, both spread over `hdf5.<phase>.num_workers` processes:
1. the jsonl records are cut into tasks of consecutive lines; each task checks the images, tokenises its
   conversations in one batched call and writes `examples_<task>_<proc>.h5` (input order);
2. a seeded permutation of all examples (across every task) is cut into `shard_size` pieces, each written
   as one `data-<chunk>.h5`.
What a file holds depends only on the inputs, the settings and the seed, so any number of processes gives
byte-identical files. Everything is written inside a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from llava_core.config import PipelineConfig, partial_dir, replace_dir, staged, write_json_atomic
from llava_core.images import ImageChecker, ImageRejected, clip_transform, load_rgb
from llava_core.prompts import (
    PromptError,
    Segments,
    conversation_segments,
    encode_segments_batch,
    placeholder_problem,
    text_is_valid_unicode,
)

if TYPE_CHECKING:  # the writer's processes never import torch; the reader imports it when it runs
    import torch

NO_IMAGE = b"None"
ROWS = ("input_ids", "loss_mask", "labels", "key_padding_mask")
MAX_RECORDS_PER_TASK = 1024  # bounds a task's memory: 1024 x 4 x MSL int32 (32 MiB at MSL 2048)


@dataclass
class Hdf5Result:
    phase: str
    path: Path
    examples: int
    processed: int
    discarded: dict[str, int] = field(default_factory=dict)
    image_start_idx: int = 0
    image_notes: dict[str, int] = field(default_factory=dict)
    files: int = 0


def example_rows(
    enc_ids: list[int], enc_loss: list[int], msl: int, pad_id: int, image_start: int, num_patches: int, has_image: bool
) -> np.ndarray:
    """Pack one encoded conversation into the (4, MSL) int32 block."""
    return pack_examples([(enc_ids, enc_loss, has_image)], msl, pad_id, image_start, num_patches)[0]


def pack_examples(
    examples: list[tuple[list[int], list[int], bool]], msl: int, pad_id: int, image_start: int, num_patches: int
) -> np.ndarray:
    """(ids, loss, has_image) of encoded conversations (each at most MSL long) -> int32 (N, 4, MSL)."""
    n = len(examples)
    data = np.zeros((n, 4, msl), dtype=np.int32)
    ids, loss = data[:, 0], data[:, 1]
    ids[:] = pad_id
    lengths = np.empty(n, dtype=np.int64)
    for k, (enc_ids, enc_loss, _) in enumerate(examples):
        m = len(enc_ids)
        lengths[k] = m
        ids[k, :m] = enc_ids
        loss[k, : m - 1] = enc_loss[1:m]  # aligned with labels: labels[t] = ids[t + 1]
    data[:, 2, :-1] = ids[:, 1:]
    data[:, 2, -1] = pad_id
    data[:, 3] = np.arange(msl)[None, :] >= lengths[:, None]  # 1 after the sequence
    text_only = np.array([not has_image for _, _, has_image in examples], dtype=bool)
    data[text_only, 3, image_start : image_start + num_patches] = 1  # text-only: the slots are not attended
    return data


# --- the writer's tasks (run in this process or in worker processes) --------------------------------------


@dataclass(frozen=True)
class WriterSpec:
    """Everything a writer process needs: plain values only (sent to `spawn`ed workers)."""

    phase: str
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


class TaskRunner:
    """Turns a range of jsonl lines into an examples file: checks, batched tokenisation, packing."""

    def __init__(self, spec: WriterSpec) -> None:
        self.spec = spec
        self.images = ImageChecker(Path(spec.image_root), spec.min_image_size)
        if spec.tokenizer_json is not None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(spec.tokenizer_json)

            def encode_batch(texts: list[str]) -> list[list[int]]:
                return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

        else:
            from llava_core.tokenizer import load_tokenizer

            tok = load_tokenizer(spec.tokenizer_path)

            def encode_batch(texts: list[str]) -> list[list[int]]:
                return [tok.encode(t, add_special_tokens=False) for t in texts]

        self.encode_batch = encode_batch

    def _record(self, line: bytes, res: TaskResult) -> tuple[Segments, str | None] | None:
        """Parse and check one record, its image aside: (segments, image path or None); None (with the reason
        counted) when it is rejected."""
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
            segments = conversation_segments(conv, s.style)
        except PromptError as e:
            res.discarded[e.reason] += 1
            return None
        problem = placeholder_problem(conv, image is not None)
        if problem is None and s.phase == "phase1" and image is None:
            problem = "phase1_without_image"
        if problem is not None:
            res.discarded[problem] += 1
            return None
        return segments, image

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
        parsed: list[tuple[Segments, str | None]] = []
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
            checks = checker.submit(self._check_images, [image for _, image in parsed if image is not None])
            segments = [seg for seg, _ in parsed]
            encoded = encode_segments_batch(segments, self.encode_batch, s.bos_id, s.eos_id, s.num_patches, s.pad_id)
            infos = iter(checks.result())
        rows, paths = [], []
        for (_, image), enc in zip(parsed, encoded, strict=True):
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
            rows.append((enc.input_ids, enc.loss_mask, image is not None))
            paths.append(image.encode("utf-8") if image is not None else NO_IMAGE)
        if not rows:
            return res
        if len(res.image_starts) != 1:  # packing needs one start; the parent reports several as an error
            return res
        data = pack_examples(rows, s.msl, s.pad_id, next(iter(res.image_starts)), s.num_patches)
        lengths = np.array([len(r[0]) for r in rows])
        res.examples = len(rows)
        res.text_only = sum(p == NO_IMAGE for p in paths)
        res.non_pad_tokens = int((data[:, 3] == 0).sum())
        res.loss_valid_tokens = int(data[:, 1].sum())
        res.max_token_id = int(data[:, 0].max())
        res.min_length, res.max_length, res.sum_length = int(lengths.min()), int(lengths.max()), int(lengths.sum())
        with h5_file(out) as h5:  # contiguous: the shuffle step reads rows in any order
            h5.attrs["n_examples"] = len(rows)
            h5.create_dataset("data", data=data)
            h5.create_dataset("img_path", data=np.array([[p] for p in paths], dtype=object), dtype=_STR)
        res.file = out
        return res


_STR = h5py.string_dtype(encoding="utf-8")


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


_RUNNER: TaskRunner | None = None  # one per worker process


def _watch_parent(parent: int) -> None:
    """A worker whose parent was killed exits instead of writing on."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _init_worker(spec: WriterSpec, parent: int) -> None:
    global _RUNNER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    _RUNNER = TaskRunner(spec)


def _run_task(args: tuple) -> TaskResult:
    assert _RUNNER is not None
    return _RUNNER.run(*args)


def write_shard(out: str, sources: list[tuple[str, list[int], list[int]]], n: int, msl: int) -> None:
    """Write one output file: `sources` = (examples file, its rows, their positions in this file)."""
    data = np.empty((n, 4, msl), dtype=np.int32)
    paths = np.empty((n, 1), dtype=object)
    for file, rows, positions in sources:
        order = np.argsort(rows)
        rows_sorted = np.asarray(rows)[order]
        pos_sorted = np.asarray(positions)[order]
        with h5py.File(file, "r") as h5:
            data[pos_sorted] = h5["data"][rows_sorted]  # h5py reads increasing row lists
            paths[pos_sorted] = h5["img_path"][rows_sorted]
    with h5_file(out) as h5:
        h5.attrs["n_examples"] = n
        h5.create_dataset("data", data=data, dtype="int32", chunks=(1, 4, msl))
        h5.create_dataset("img_path", data=paths, dtype=_STR)


def _write_shard(args: tuple) -> None:
    write_shard(*args)


def line_ranges(path: Path, records_per_task: int) -> list[tuple[int, int]]:
    """Byte ranges of consecutive lines, `records_per_task` non-blank lines each (the last may be shorter)."""
    ranges, start, count, pos = [], 0, 0, 0
    with open(path, "rb") as f:
        for line in f:
            pos += len(line)
            if line.strip():
                count += 1
                if count == records_per_task:
                    ranges.append((start, pos))
                    start, count = pos, 0
    if count:
        ranges.append((start, pos))
    return ranges


def count_records(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


class _Pool:
    """`map` in this process (one worker) or over `spawn`ed processes (never fork a threaded Dagster process)."""

    def __init__(self, spec: WriterSpec, workers: int) -> None:
        self.spec, self.workers = spec, workers
        self.executor: ProcessPoolExecutor | None = None
        self.runner: TaskRunner | None = None

    def __enter__(self) -> _Pool:
        if self.workers > 1:
            self.executor = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.spec, os.getpid()),
            )
        else:
            self.runner = TaskRunner(self.spec)
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)

    def tasks(self, tasks: list[tuple]) -> list[TaskResult]:
        if self.executor is not None:
            return list(self.executor.map(_run_task, tasks))
        assert self.runner is not None
        return [self.runner.run(*t) for t in tasks]

    def shards(self, shards: list[tuple]) -> None:
        if self.executor is not None:
            list(self.executor.map(_write_shard, shards))
        else:
            for s in shards:
                write_shard(*s)


def _writer_spec(cfg: PipelineConfig, phase: str):
    """The tokenizer and the numbers the writer needs (loads transformers: the parent process only)."""
    from llava_core.model import vision_geometry
    from llava_core.tokenizer import load_tokenizer

    hc = cfg.hdf5[phase]
    tok_path = cfg.resolve_file(cfg.model.tokenizer)
    tok = load_tokenizer(tok_path)
    image_size, patch = vision_geometry(cfg)
    num_patches = (image_size // patch) ** 2
    if hc.max_sequence_length <= num_patches + 2:
        raise ValueError(
            f"hdf5.{phase}.max_sequence_length {hc.max_sequence_length} leaves no room for text after "
            f"{num_patches} patches"
        )
    backend = getattr(tok, "backend_tokenizer", None)
    spec = WriterSpec(
        phase=phase,
        style=hc.prompt_style,
        msl=hc.max_sequence_length,
        num_patches=num_patches,
        pad_id=tok.pad_token_id,
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        min_image_size=hc.min_image_size,
        image_root=str(cfg.image_root),
        tokenizer_json=backend.to_str() if backend is not None else None,
        tokenizer_path=tok_path,
    )
    return spec, tok, image_size, patch


def build_hdf5(cfg: PipelineConfig, phase: str) -> Hdf5Result:
    """Tokenise the phase's jsonl files into shuffled HDF5 shards under `data/hdf5/<phase>/`."""
    if phase not in cfg.hdf5:
        raise KeyError(f"unknown phase {phase!r}; valid: {sorted(cfg.hdf5)}")
    hc = cfg.hdf5[phase]
    inputs = [cfg.jsonl_path(d) for d in cfg.datasets_for(phase)]
    if not inputs:
        raise ValueError(f"no dataset is configured for {phase}; add one under 'datasets' with phase: {phase}")
    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the conversion stage first")
    spec, tok, image_size, patch = _writer_spec(cfg, phase)

    out = cfg.hdf5_dir(phase)
    tmp = partial_dir(out)
    # a run-specific folder: the workers of a killed run cannot write into the next run's folder
    work = tmp / f".examples-{uuid.uuid4().hex}"
    work.mkdir()
    n_records = sum(count_records(p) for p in inputs)
    per_task = max(1, min(MAX_RECORDS_PER_TASK, math.ceil(n_records / (4 * hc.num_workers))))
    tasks = []
    for path in inputs:
        for start, end in line_ranges(path, per_task):
            k = len(tasks)
            tasks.append((k, str(path), start, end, str(work / f"examples_{k:05d}_{os.getpid()}.h5")))

    with staged(out, tmp):  # a failed run leaves no temporary files (a killed one's: the next run removes them)
        with _Pool(spec, hc.num_workers) as pool:
            results = pool.tasks(tasks)
            total = _Totals(results, inputs, tasks)
            if len(total.image_starts) > 1:
                raise AssertionError(
                    f"image slots start at several indices {sorted(total.image_starts)}; the model needs one"
                )
            if total.examples == 0:
                raise ValueError(
                    f"{phase}: no example survived ({dict(total.discarded)}) out of {total.processed} records"
                )
            # the shuffle: one seeded permutation of every example, cut into shards
            order = np.random.default_rng(cfg.seed).permutation(total.examples)
            owner = np.searchsorted(total.offsets, order, side="right") - 1  # which examples file holds each
            shards, files = [], []
            for chunk, begin in enumerate(range(0, total.examples, hc.shard_size)):
                sel = order[begin : begin + hc.shard_size]
                own = owner[begin : begin + hc.shard_size]
                sources = []
                for r in np.unique(own):
                    where = np.nonzero(own == r)[0]
                    rows = (sel[where] - total.offsets[r]).tolist()
                    sources.append((total.files[r], rows, where.tolist()))
                name = f"data-{chunk:05d}.h5"
                shards.append((str(tmp / name), sources, len(sel), spec.msl))
                files.append({"file": name, "n_examples": len(sel)})
            pool.shards(shards)
        shutil.rmtree(work)

        image_start = next(iter(total.image_starts))
        params = {
            "phase": phase,
            "settings": {
                "prompt_style": hc.prompt_style,
                "max_sequence_length": spec.msl,
                "shard_size": hc.shard_size,
                "min_image_size": hc.min_image_size,
                "tokenizer": cfg.model.tokenizer,
                "image_size": image_size,
                "patch_size": patch,
                "seed": cfg.seed,
                "inputs": [str(p) for p in inputs],
                "image_root": str(cfg.image_root),
            },
            "processed": total.processed,
            "processed_by_input": total.processed_by_input,
            "discarded": sum(total.discarded.values()),
            "discarded_by_reason": dict(sorted(total.discarded.items())),
            "examples": total.examples,
            "text_only_examples": total.text_only,
            "image_notes": dict(sorted(total.image_notes.items())),
            "files": files,
            "shuffle": {"seed": cfg.seed, "across_files": True},
            "eos_id": spec.eos_id,
            "pad_id": spec.pad_id,
            "bos_id": spec.bos_id,
            "vocab_size": len(tok),
            "token_stats": total.token_stats(spec.msl),
            "image_patch_info": {"image_patch_start_idx": image_start, "num_patches": spec.num_patches},
        }
        write_json_atomic(tmp / "data_params.json", params)
    replace_dir(tmp, out)
    return Hdf5Result(
        phase,
        out,
        total.examples,
        total.processed,
        dict(total.discarded),
        image_start,
        dict(total.image_notes),
        len(files),
    )


class _Totals:
    """The task results summed, in input order."""

    def __init__(self, results: list[TaskResult], inputs: list[Path], tasks: list[tuple]) -> None:
        self.discarded: Counter = Counter()
        self.image_notes: Counter = Counter()
        self.image_starts: set = set()
        self.processed_by_input = {p.stem: 0 for p in inputs}
        kept = [r for r in results if r.examples]
        for r, task in zip(results, tasks, strict=True):
            self.discarded.update(r.discarded)
            self.image_notes.update(r.image_notes)
            self.image_starts |= r.image_starts
            self.processed_by_input[Path(task[1]).stem] += r.processed
        self.processed = sum(r.processed for r in results)
        self.examples = sum(r.examples for r in kept)
        self.text_only = sum(r.text_only for r in kept)
        self.files = [r.file for r in kept]
        self.offsets = np.cumsum([0] + [r.examples for r in kept])
        self.kept = kept

    def token_stats(self, msl: int) -> dict:
        k = self.kept
        non_pad = sum(r.non_pad_tokens for r in k)
        loss = sum(r.loss_valid_tokens for r in k)
        return {
            "num_tokens": self.examples * msl,
            "non_pad_tokens": non_pad,
            "loss_valid_tokens": loss,
            "supervised_fraction": loss / max(1, non_pad),
            "max_token_id": max(r.max_token_id for r in k),
            "sequence_length": {
                "min": min(r.min_length for r in k),
                "mean": sum(r.sum_length for r in k) / self.examples,
                "max": max(r.max_length for r in k),
            },
        }


# --- the training-side reader ------------------------------------------------------------------------------


class LlavaHdf5Dataset:
    """Random access over the shards of one HDF5 folder (a map-style torch dataset).

    Each process opens its own file handles: a loader worker (forked or spawned) never uses its parent's.
    """

    def __init__(self, folder: Path, image_root: Path, image_size: int) -> None:
        self.folder = Path(folder)
        self.params = json.loads((self.folder / "data_params.json").read_text())
        self.image_root = Path(image_root)
        self.image_size = image_size
        self.files = [self.folder / f["file"] for f in self.params["files"]]
        self.offsets = np.cumsum([0] + [f["n_examples"] for f in self.params["files"]])
        self.image_start = self.params["image_patch_info"]["image_patch_start_idx"]
        self._handles: dict[int, h5py.File] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:  # pickled into a spawned worker: without open handles
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state

    def _file(self, k: int) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: never share h5py handles across processes
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = h5py.File(self.files[k], "r")
        return self._handles[k]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import torch

        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        h5 = self._file(k)
        j = i - int(self.offsets[k])
        block = torch.from_numpy(h5["data"][j].astype(np.int64))  # (4, MSL)
        raw = h5["img_path"][j][0]
        rel = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        has_image = rel != NO_IMAGE.decode()
        if has_image:
            pixels = clip_transform(load_rgb(self.image_root / rel), self.image_size)
        else:
            pixels = torch.zeros(3, self.image_size, self.image_size)
        return {
            "input_ids": block[0],
            "loss_mask": block[1],
            "labels": block[2],
            "attention_mask": 1 - block[3],
            "pixel_values": pixels,
            "has_image": torch.tensor(has_image),
        }


def collate_trimmed(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack examples and drop the trailing columns no example attends to (right padding only).

    Sequences are right-padded to MSL in the files; trimming to the longest sequence of the batch saves the
    compute of the padding without changing any attended token, label or loss position.
    """
    import torch

    batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    attended = batch["attention_mask"].any(dim=0).nonzero()
    length = int(attended.max()) + 1 if len(attended) else batch["input_ids"].shape[1]
    for k in ("input_ids", "loss_mask", "labels", "attention_mask"):
        batch[k] = batch[k][:, :length]
    return batch
