"""The HDF5 folder of one phase: its layout facts and the one reader of its files (docs/formats.md).

A folder holds `data-<chunk>.h5` files and `data_params.json` (the file list, counts and token facts). Each
file has the attribute `n_examples`, a dataset `data` int32 (N, 4, MSL) whose rows are `ROWS`, chunked
(1, 4, MSL), and `img_path` (N, 1) UTF-8 strings relative to the image root (`NO_IMAGE` for text-only).
The writer (`hdf5_writer`), the gate (`validate`), the sampler and the training dataset all read through
`Hdf5Folder`: in blocks of rows (bounded memory) or one example at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from llava_core.artifacts import DATA_PARAMS

NO_IMAGE = b"None"
ROWS = ("input_ids", "loss_mask", "labels", "key_padding_mask")
STRING = h5py.string_dtype(encoding="utf-8")
BLOCK = 4096  # rows read at once: 4096 x 4 x MSL int32 (128 MiB at MSL 2048)
# Random access keeps at most this many shards open (least recently used closed first): each open file holds
# h5py's chunk cache (~0.7 MiB after a few random reads), so a loader over 1M examples in 500 shards held 350 MiB
# more than one over 100k (benchmarks/bench_scale.py); reopening a shard costs well under a millisecond.
MAX_OPEN_FILES = 32


def shard_name(chunk: int) -> str:
    """The name of the folder's `chunk`-th file."""
    return f"data-{chunk:05d}.h5"


def image_path(raw: bytes | str) -> str | None:
    """An `img_path` cell as a relative path, or None for a text-only example."""
    value = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    return None if value == NO_IMAGE.decode() else value


def read_data_params(folder: Path) -> dict:
    path = Path(folder) / DATA_PARAMS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the folder is not a finished HDF5 stage output")
    return json.loads(path.read_text())


@dataclass
class Block:
    """Consecutive examples of one file: `data` (b, len(rows), MSL) of the rows asked for (None for no rows),
    `paths` (b,)."""

    file: str
    start: int  # index of the first example in its file
    index: int  # index of the first example in the whole folder
    data: np.ndarray | None
    paths: list[str | None]


class Hdf5Folder:
    """Every example of a phase's HDF5 folder, in the order of `data_params.json`'s file list."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.params = read_data_params(self.folder)
        self.files = [self.folder / f["file"] for f in self.params["files"]]
        self.offsets = np.cumsum([0] + [f["n_examples"] for f in self.params["files"]])
        self._handles: dict[int, h5py.File] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def image_start(self) -> int:
        return int(self.params["image_patch_info"]["image_patch_start_idx"])

    @property
    def num_patches(self) -> int:
        return int(self.params["image_patch_info"]["num_patches"])

    def blocks(self, rows: tuple[int, ...] | None = None, block: int = BLOCK) -> Iterator[Block]:
        """The examples in blocks of at most `block`, with the `data` rows in `rows` (default: all four)."""
        for k, path in enumerate(self.files):
            with h5py.File(path, "r") as h5:
                n = h5["data"].shape[0]
                for start in range(0, n, block):
                    stop = min(n, start + block)
                    if rows is None:
                        data = h5["data"][start:stop]
                    else:  # () reads no token rows: the image paths only
                        data = h5["data"][start:stop, list(rows), :] if rows else None
                    paths = [image_path(p) for p in h5["img_path"][start:stop, 0]]
                    yield Block(path.name, start, int(self.offsets[k]) + start, data, paths)

    def __getstate__(self) -> dict:  # pickled into a spawned loader worker: without open handles
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state

    def _file(self, k: int) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: never share h5py handles across processes
            self._handles, self._pid = {}, os.getpid()
        h5 = self._handles.pop(k, None)  # re-inserted below: the dict's order is the order of last use
        if h5 is None:
            if len(self._handles) >= MAX_OPEN_FILES:
                self._handles.pop(next(iter(self._handles))).close()
            h5 = h5py.File(self.files[k], "r")
        self._handles[k] = h5
        return h5

    def example(self, i: int) -> tuple[np.ndarray, str | None]:
        """Example `i`: its (4, MSL) int32 block and its image path (None: text-only)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        h5 = self._file(k)
        j = i - int(self.offsets[k])
        return h5["data"][j], image_path(h5["img_path"][j][0])
