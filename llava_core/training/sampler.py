"""The training data order: seeded per epoch, sharded over ranks, resumable at any micro-batch.

Each epoch's order is a pure function of (seed, epoch), so a resumed run only needs the position
(epoch, micro-batches consumed on this rank) to continue with exactly the batches an uninterrupted run
would have drawn. Optionally batches are grouped by modality and length (as LLaVA's
`group_by_modality_length`): image and text-only records never share a batch, and records of similar length
do, which saves the padding `collate_trimmed` would otherwise keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_core.data.hdf5_format import Hdf5Folder

MEGABATCH = 8  # micro-batches per length-sorted group: sorting wider windows only adds order bias


@dataclass
class RecordInfo:
    has_image: np.ndarray  # (N,) bool
    length: np.ndarray  # (N,) int: attended tokens


def record_info(folder: Path, with_lengths: bool = True) -> RecordInfo:
    """Modality and attended length of every example of an HDF5 folder, in the dataset's order.

    The lengths need a pass over the key-padding rows; without `with_lengths` only the image paths are read and
    every length is 0.
    """
    images, lengths = [], []
    data = Hdf5Folder(folder)
    for block in data.blocks(rows=(3,) if with_lengths else ()):
        images.append(np.array([p is not None for p in block.paths], dtype=bool))
        if with_lengths:
            lengths.append((block.data[:, 0, :] == 0).sum(axis=1))  # (b, MSL), 1 = do not attend
        else:
            lengths.append(np.zeros(len(block.paths), dtype=np.int64))
    if not lengths:
        return RecordInfo(np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64))
    return RecordInfo(np.concatenate(images), np.concatenate(lengths).astype(np.int64))


class EpochBatches:
    """The micro-batches (lists of dataset indices) of each epoch, for one rank of `num_replicas`."""

    def __init__(
        self,
        info: RecordInfo,
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        group_by_modality_length: bool = False,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        if len(info.has_image) == 0:
            raise ValueError("no training examples")
        self.info, self.batch_size, self.seed = info, batch_size, seed
        self.num_replicas, self.rank, self.grouped = num_replicas, rank, group_by_modality_length

    def _global(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        n, b = len(self.info.has_image), self.batch_size
        if not self.grouped:
            order = rng.permutation(n)
            batches = [order[i : i + b].tolist() for i in range(0, n, b)]
        else:
            batches = []
            for modality in (True, False):
                idx = np.flatnonzero(self.info.has_image == modality)
                idx = idx[rng.permutation(len(idx))]
                mega = b * MEGABATCH
                for i in range(0, len(idx), mega):
                    chunk = idx[i : i + mega]
                    chunk = chunk[np.argsort(-self.info.length[chunk], kind="stable")]  # longest first
                    batches += [chunk[j : j + b].tolist() for j in range(0, len(chunk), b)]
            batches = [batches[k] for k in rng.permutation(len(batches))]
        # every rank gets the same number of micro-batches: wrap around to the first ones (as accelerate's
        # even_batches does), so collective calls stay matched
        short = -len(batches) % self.num_replicas
        return batches + batches[:short]

    def __call__(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of `epoch`."""
        return self._global(epoch)[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        """Micro-batches per epoch on one rank (the same for every epoch)."""
        return len(self(0))


@dataclass
class DataPosition:
    """Where the data stream stands: the epoch and the micro-batches this rank consumed in it.

    Registered with accelerate's checkpointing (`state_dict`/`load_state_dict`), so it is saved and restored
    with the model, optimizer, scheduler and RNG states.
    """

    epoch: int = 0
    offset: int = 0
    step: int = 0  # optimizer steps done

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self.step = int(state["epoch"]), int(state["offset"]), int(state["step"])
