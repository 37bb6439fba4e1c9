"""Stage 3, HDF5: tokenised LLaVA examples with image slots and loss masks (docs/formats.md).

Layout (Cerebras ModelZoo compatible): files `data-<chunk>.h5`, each with attribute `n_examples`, a dataset
`data` int32 (N, 4, MSL) whose rows are input_ids, loss_mask, labels (= input_ids shifted left by one) and
key_padding_mask (1 = do not attend), chunked (1, 4, MSL), and `img_path` (N, 1) bytes relative to the
image root (b"None" for text-only samples). `data_params.json` records settings, counts and statistics.

The loss mask is aligned with `labels`: position t is supervised when labels[t] is an answer token (or the
`</s>` closing an answer).

Two steps, both spread over `hdf5.<phase>.num_workers` processes:
1. the jsonl records are cut into tasks of consecutive lines; each task checks the images (decoding only files
   the image checks' cache does not know: `image_cache`), tokenises its conversations in one batched call and
   appends its examples to its process's spool (`hdf5_shuffle`);
2. a seeded permutation of all examples (in input order, across every task) is cut into `shard_size` pieces,
   each written as one `data-<chunk>.h5` from the spools.
What a file holds depends only on the inputs, the settings and the seed, so any number of processes gives
byte-identical files. Memory is bounded by the task and shard sizes and the number of processes (plus 8 bytes
per example for the permutation). Everything is written inside a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from llava_core.artifacts import DATA_PARAMS
from llava_core.atomic import partial_dir, replace_dir, staged, write_json_atomic
from llava_core.config import PipelineConfig
from llava_core.data.hdf5_examples import TaskResult, TaskRunner, WriterSpec, init_worker, run_task
from llava_core.data.hdf5_format import shard_name
from llava_core.data.hdf5_shuffle import Layout, shard_jobs, write_shard
from llava_core.data.image_cache import cache_folder
from llava_core.data.prompts import PROMPT_SUFFIXES
from llava_core.phases import get_phase

log = logging.getLogger(__name__)
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
    images_decoded: int = 0  # image files this run decoded
    images_cached: int = 0  # image checks answered by the image checks' cache (no decode)
    step_seconds: dict[str, float] = field(default_factory=dict)  # examples (check, tokenise, spool), shuffle


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
                initializer=init_worker,
                initargs=(self.spec, os.getpid()),
            )
            for _ in range(self.workers):  # start them now: they import while this process reads the inputs
                self.executor.submit(os.getpid)
        else:
            self.runner = TaskRunner(self.spec)
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
        if self.runner is not None:
            self.runner.close()

    def tasks(self, tasks: list[tuple]) -> list[TaskResult]:
        if self.executor is not None:
            return list(self.executor.map(run_task, tasks))
        assert self.runner is not None
        results = list(self.runner.run_all(tasks))
        self.runner.close()  # the spool complete on disk before the shuffle reads it
        return results

    def shards(self, jobs: Iterator[tuple]) -> None:
        """Write every shard; at most two jobs per process wait at a time (a job holds its shard's row list)."""
        if self.executor is None:
            for job in jobs:
                write_shard(*job)
            return
        pending: set = set()
        for job in jobs:
            if len(pending) >= 2 * self.workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()
            pending.add(self.executor.submit(write_shard, *job))
        for f in pending:
            f.result()


def _writer_spec(cfg: PipelineConfig, phase: str):
    """The tokenizer and the numbers the writer needs (loads transformers: the parent process only)."""
    from llava_core.data.tokenizer import load_tokenizer
    from llava_core.model.geometry import vision_geometry

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
        image_cache=str(cache_folder(cfg.image_root)),
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
    """Ranges of consecutive lines (at most MAX_RECORDS_PER_TASK, about 4 tasks per worker) and the work folder."""
    n_records = sum(count_records(p) for p in inputs)
    per_task = max(1, min(MAX_RECORDS_PER_TASK, math.ceil(n_records / (4 * num_workers))))
    tasks = []
    for path in inputs:
        for start, end in line_ranges(path, per_task):
            tasks.append((len(tasks), str(path), start, end, str(work)))
    return tasks


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
        # per dataset, the examples' human turns by the evaluation suffix they end with (evaluation/suffixes.py)
        "question_suffixes": {d: {n: c[n] for n in PROMPT_SUFFIXES} for d, c in total.suffixes_by_input.items()},
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
    with staged(out, tmp):  # a failed run leaves no temporary files (a killed one's: the next run removes them)
        with _Pool(spec, hc.num_workers) as pool:
            t0 = time.perf_counter()
            tasks = _tasks(inputs, work, hc.num_workers)  # (the workers start meanwhile)
            total = _Totals(pool.tasks(tasks), inputs, tasks)
            t1 = time.perf_counter()
            if len(total.image_starts) > 1:
                raise AssertionError(
                    f"image slots start at several indices {sorted(total.image_starts)}; the model needs one"
                )
            if total.examples == 0:
                raise ValueError(
                    f"{phase}: no example survived ({dict(total.discarded)}) out of {total.processed} records"
                )
            pool.shards(shard_jobs(Layout.of(total.placements), cfg.seed, hc.shard_size, tmp, spec.msl))
            files = total.files(hc.shard_size)
            steps = {"examples": t1 - t0, "shuffle": time.perf_counter() - t1}
            log.info(f"{phase}: {total.processed:,} records checked, tokenised and spooled in {steps['examples']:.1f} s, "
                     f"{total.examples:,} examples shuffled into {len(files)} file(s) in {steps['shuffle']:.1f} s")  # fmt: skip
        shutil.rmtree(work)
        params = _data_params(cfg, phase, spec, tok, (image_size, patch), total, files)
        write_json_atomic(tmp / DATA_PARAMS, params)
    replace_dir(tmp, out)
    start = params["image_patch_info"]["image_patch_start_idx"]
    discarded, notes = dict(total.discarded), dict(total.image_notes)
    cached = total.images_checked - total.images_decoded
    return Hdf5Result(phase, out, total.examples, total.processed, discarded, start, notes, len(files),
                      total.images_decoded, cached, steps)  # fmt: skip


class _Totals:
    """The task results summed, in input order."""

    def __init__(self, results: list[TaskResult], inputs: list[Path], tasks: list[tuple]) -> None:
        self.discarded: Counter = Counter()
        self.image_notes: Counter = Counter()
        self.image_starts: set = set()
        self.processed_by_input = {p.stem: 0 for p in inputs}
        self.suffixes_by_input: dict[str, Counter] = {p.stem: Counter() for p in inputs}
        kept = [r for r in results if r.examples]
        for r, task in zip(results, tasks, strict=True):
            self.discarded.update(r.discarded)
            self.image_notes.update(r.image_notes)
            self.image_starts |= r.image_starts
            self.processed_by_input[Path(task[1]).stem] += r.processed
            self.suffixes_by_input[Path(task[1]).stem].update(r.suffixes)
        self.processed = sum(r.processed for r in results)
        self.examples = sum(r.examples for r in kept)
        self.text_only = sum(r.text_only for r in kept)
        self.placements = [(r.spool, r.first_row, r.examples) for r in kept]
        self.images_checked = sum(r.images_checked for r in results)
        self.images_decoded = sum(r.images_decoded for r in results)
        self.kept = kept

    def files(self, shard_size: int) -> list[dict]:
        """The shards `shard_jobs` writes: `shard_size` examples each, the last the rest."""
        return [
            {"file": shard_name(chunk), "n_examples": min(shard_size, self.examples - begin)}
            for chunk, begin in enumerate(range(0, self.examples, shard_size))
        ]

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
