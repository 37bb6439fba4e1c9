"""The HDF5 writer's spools and its shuffle: examples appended per writer process, then dealt into shuffled shards.

First pass: each writer process appends the examples of every task it runs to its own spool, three flat files
(the (n, 4, MSL) int32 rows, the image paths' bytes, and each path's offset and length); a task reports where
its rows landed. Second pass: one seeded permutation of all examples in input order (not in spool order: the
files must not depend on which process ran which task) is cut into `shard_size` pieces, and each piece becomes a
`data-<chunk>.h5` whose rows are read from the spools with positioned reads (`os.pread`: a memory map would count
every page it touched as the process's resident memory). A shard opens at most one spool per writer process, so
the second pass costs in proportion to the examples; opening a file per task for every shard (the earlier
design) grew with examples x tasks.

Spools are written with Python's own writes: a full disk raises ENOSPC here, which `staged` reports by name.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from llava_core.data.hdf5_format import STRING, shard_name

INDEX = np.dtype([("offset", "<i8"), ("length", "<i8")])


class Spool:
    """Append-only examples of one writer process: `<name>.rows`, `<name>.paths`, `<name>.index`."""

    def __init__(self, folder: Path, msl: int) -> None:
        self.name = str(Path(folder) / f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.msl = msl
        self.rows = 0
        self.path_bytes = 0
        self._files = {ext: open(f"{self.name}.{ext}", "wb") for ext in ("rows", "paths", "index")}

    def append(self, data: np.ndarray, paths: list[bytes]) -> int:
        """Write (n, 4, MSL) int32 rows and their n image paths; the index of the first row in this spool."""
        first = self.rows
        lengths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
        index = np.empty(len(paths), dtype=INDEX)
        index["length"] = lengths
        index["offset"] = self.path_bytes + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self._files["rows"].write(np.ascontiguousarray(data, dtype=np.int32).tobytes())
        self._files["paths"].write(b"".join(paths))
        self._files["index"].write(index.tobytes())
        for f in self._files.values():  # the parent reads the spool as soon as the task's result arrives
            f.flush()
        self.rows += len(paths)
        self.path_bytes += int(lengths.sum())
        return first

    def close(self) -> None:
        for f in self._files.values():
            f.close()


class SpoolReader:
    """Positioned reads of one spool's rows and paths (no memory map: bounded resident memory)."""

    def __init__(self, name: str, msl: int) -> None:
        self.name, self.row_bytes = name, 4 * msl * 4
        self.fds = {ext: os.open(f"{name}.{ext}", os.O_RDONLY) for ext in ("rows", "paths", "index")}

    def read(self, rows: np.ndarray, data: np.ndarray, paths: np.ndarray, positions: np.ndarray) -> None:
        """Rows `rows` of the spool into `data[positions]` and `paths[positions, 0]` (in increasing row order)."""
        fd_rows, fd_paths, fd_index = self.fds["rows"], self.fds["paths"], self.fds["index"]
        entry = bytearray(INDEX.itemsize)
        for row, pos in zip(rows.tolist(), positions.tolist(), strict=True):
            if os.preadv(fd_rows, [memoryview(data[pos]).cast("B")], row * self.row_bytes) != self.row_bytes:
                raise OSError(f"spool {self.name} ends before row {row}")
            os.preadv(fd_index, [entry], row * INDEX.itemsize)
            offset, length = np.frombuffer(entry, dtype=INDEX)[0]
            paths[pos, 0] = os.pread(fd_paths, int(length), int(offset))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


@dataclass
class Layout:
    """Where the examples sit, in input order: the kept tasks' spools, first rows and counts."""

    spools: list[str]  # spool names
    spool_of: np.ndarray  # (tasks,) index into spools
    first_row: np.ndarray  # (tasks,) the task's first row in its spool
    offsets: np.ndarray  # (tasks + 1,) the tasks' first example in input order, then the total

    @classmethod
    def of(cls, placements: list[tuple[str, int, int]]) -> Layout:
        """From (spool, first row, count) of each task with examples, in input order."""
        spools = sorted({s for s, _, _ in placements})
        number = {s: k for k, s in enumerate(spools)}
        return cls(
            spools,
            np.array([number[s] for s, _, _ in placements], dtype=np.int64),
            np.array([r for _, r, _ in placements], dtype=np.int64),
            np.cumsum([0] + [n for _, _, n in placements]).astype(np.int64),
        )


def shard_jobs(layout: Layout, seed: int, shard_size: int, folder: Path, msl: int) -> Iterator[tuple]:
    """The write jobs of the shuffled shards, one at a time: (out, [(spool, rows, positions)], n, msl).

    The permutation is the one `np.random.default_rng(seed).permutation(examples)` gives (8 bytes per example in
    this process); a job holds only its shard's rows."""
    total = int(layout.offsets[-1])
    order = np.random.default_rng(seed).permutation(total)
    for chunk, begin in enumerate(range(0, total, shard_size)):
        sel = order[begin : begin + shard_size]
        task = np.searchsorted(layout.offsets, sel, side="right") - 1
        spool = layout.spool_of[task]
        row = layout.first_row[task] + (sel - layout.offsets[task])
        sources = []
        for s in np.unique(spool):
            where = np.flatnonzero(spool == s)
            by_row = where[np.argsort(row[where], kind="stable")]  # increasing rows: forward reads
            sources.append((layout.spools[s], row[by_row], by_row))
        yield str(Path(folder) / shard_name(chunk)), sources, len(sel), msl


def write_shard(out: str, sources: list[tuple[str, np.ndarray, np.ndarray]], n: int, msl: int) -> None:
    """One output file from its rows in the spools (built in memory: bounded by the shard size)."""
    data = np.empty((n, 4, msl), dtype=np.int32)
    paths = np.empty((n, 1), dtype=object)
    for spool, rows, positions in sources:
        reader = SpoolReader(spool, msl)
        try:
            reader.read(rows, data, paths, positions)
        finally:
            reader.close()
    with h5_file(out) as h5:
        h5.attrs["n_examples"] = n
        h5.create_dataset("data", data=data, dtype="int32", chunks=(1, 4, msl))
        h5.create_dataset("img_path", data=paths, dtype=STRING)


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
