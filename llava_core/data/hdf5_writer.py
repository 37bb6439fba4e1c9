"""Stage 3, HDF5: tokenised LLaVA examples with image slots and loss masks (docs/formats.md).

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

import math
import multiprocessing
import os
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from llava_core.artifacts import DATA_PARAMS
from llava_core.atomic import partial_dir, replace_dir, staged, write_json_atomic
from llava_core.config import PipelineConfig
from llava_core.data.hdf5_examples import TaskResult, TaskRunner, WriterSpec, h5_file
from llava_core.data.hdf5_format import STRING
from llava_core.phases import get_phase

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


def _init_worker(spec: WriterSpec, parent: int) -> None:
    global _RUNNER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _die_with_parent(parent)
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
        h5.create_dataset("img_path", data=paths, dtype=STRING)


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
    from llava_core.data.tokenizer import load_tokenizer
    from llava_core.model.llava import vision_geometry

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
        requires_image=get_phase(phase).requires_image,
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


def _inputs(cfg: PipelineConfig, phase: str) -> list[Path]:
    """The phase's jsonl files, which must exist."""
    inputs = [cfg.jsonl_path(d) for d in cfg.datasets_for(get_phase(phase).name)]
    if not inputs:
        raise ValueError(f"no dataset is configured for {phase}; add one under 'datasets' with phase: {phase}")
    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the conversion stage first")
    return inputs


def _tasks(inputs: list[Path], work: Path, num_workers: int) -> list[tuple]:
    """Ranges of consecutive lines (at most MAX_RECORDS_PER_TASK, about 4 tasks per worker) with their output."""
    n_records = sum(count_records(p) for p in inputs)
    per_task = max(1, min(MAX_RECORDS_PER_TASK, math.ceil(n_records / (4 * num_workers))))
    tasks = []
    for path in inputs:
        for start, end in line_ranges(path, per_task):
            k = len(tasks)
            tasks.append((k, str(path), start, end, str(work / f"examples_{k:05d}_{os.getpid()}.h5")))
    return tasks


def _shuffled_shards(total: _Totals, seed: int, shard_size: int, tmp: Path, msl: int) -> tuple[list, list]:
    """One seeded permutation of every example, cut into `shard_size` pieces: the write jobs and the file list."""
    order = np.random.default_rng(seed).permutation(total.examples)
    owner = np.searchsorted(total.offsets, order, side="right") - 1  # which examples file holds each
    shards, files = [], []
    for chunk, begin in enumerate(range(0, total.examples, shard_size)):
        sel = order[begin : begin + shard_size]
        own = owner[begin : begin + shard_size]
        sources = []
        for r in np.unique(own):
            where = np.nonzero(own == r)[0]
            rows = (sel[where] - total.offsets[r]).tolist()
            sources.append((total.files[r], rows, where.tolist()))
        name = f"data-{chunk:05d}.h5"
        shards.append((str(tmp / name), sources, len(sel), msl))
        files.append({"file": name, "n_examples": len(sel)})
    return shards, files


def _data_params(cfg: PipelineConfig, phase: str, spec: WriterSpec, tok, geometry: tuple, total, files) -> dict:
    """`data_params.json`: every setting, count and token statistic, and the image start index."""
    hc = cfg.hdf5[phase]
    image_size, patch = geometry
    return {
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
            "inputs": [cfg.rel(p) for p in _inputs(cfg, phase)],  # relative to the workspace root: portable
            "image_root": cfg.rel(cfg.image_root),
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
        "image_patch_info": {"image_patch_start_idx": next(iter(total.image_starts)), "num_patches": spec.num_patches},
    }


def build_hdf5(cfg: PipelineConfig, phase: str) -> Hdf5Result:
    """Tokenise the phase's jsonl files into shuffled HDF5 shards under `data/hdf5/<phase>/`."""
    inputs = _inputs(cfg, phase)
    hc = cfg.hdf5[phase]
    spec, tok, image_size, patch = _writer_spec(cfg, phase)
    out = cfg.hdf5_dir(phase)
    tmp = partial_dir(out)
    # a run-specific folder: the workers of a killed run cannot write into the next run's folder
    work = tmp / f".examples-{uuid.uuid4().hex}"
    work.mkdir()
    tasks = _tasks(inputs, work, hc.num_workers)
    with staged(out, tmp):  # a failed run leaves no temporary files (a killed one's: the next run removes them)
        with _Pool(spec, hc.num_workers) as pool:
            total = _Totals(pool.tasks(tasks), inputs, tasks)
            if len(total.image_starts) > 1:
                raise AssertionError(
                    f"image slots start at several indices {sorted(total.image_starts)}; the model needs one"
                )
            if total.examples == 0:
                raise ValueError(
                    f"{phase}: no example survived ({dict(total.discarded)}) out of {total.processed} records"
                )
            shards, files = _shuffled_shards(total, cfg.seed, hc.shard_size, tmp, spec.msl)
            pool.shards(shards)
        shutil.rmtree(work)
        params = _data_params(cfg, phase, spec, tok, (image_size, patch), total, files)
        write_json_atomic(tmp / DATA_PARAMS, params)
    replace_dir(tmp, out)
    start = params["image_patch_info"]["image_patch_start_idx"]
    discarded, notes = dict(total.discarded), dict(total.image_notes)
    return Hdf5Result(phase, out, total.examples, total.processed, discarded, start, notes, len(files))


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
