"""The training side of the HDF5 folder: examples as tensors (a map-style torch dataset) and the batch collate.

Examples are read through `Hdf5Folder` (the one reader); images are loaded and given the CLIP transform
(pad to square with the mean colour, resize, centre-crop, normalise) as the loader asks for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llava_core.data.hdf5_format import Hdf5Folder
from llava_core.data.images import clip_transform, load_rgb


class LlavaHdf5Dataset:
    """Random access over the shards of one HDF5 folder (each loader process opens its own file handles)."""

    def __init__(self, folder: Path, image_root: Path, image_size: int) -> None:
        self.data = Hdf5Folder(folder)
        self.params = self.data.params
        self.image_root = Path(image_root)
        self.image_size = image_size
        self.image_start = self.data.image_start

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block, rel = self.data.example(i)
        block = torch.from_numpy(block.astype(np.int64))  # (4, MSL)
        if rel is not None:
            pixels = clip_transform(load_rgb(self.image_root / rel), self.image_size)
        else:
            pixels = torch.zeros(3, self.image_size, self.image_size)
        return {
            "input_ids": block[0],
            "loss_mask": block[1],
            "labels": block[2],
            "attention_mask": 1 - block[3],
            "pixel_values": pixels,
            "has_image": torch.tensor(rel is not None),
        }


def collate_trimmed(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack examples and drop the trailing columns no example attends to (right padding only).

    Sequences are right-padded to MSL in the files; trimming to the longest sequence of the batch saves the
    compute of the padding without changing any attended token, label or loss position.
    """
    batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    attended = batch["attention_mask"].any(dim=0).nonzero()
    length = int(attended.max()) + 1 if len(attended) else batch["input_ids"].shape[1]
    for k in ("input_ids", "loss_mask", "labels", "attention_mask"):
        batch[k] = batch[k][:, :length]
    return batch
