"""Stage 3, HDF5: tokenised LLaVA examples with image slots and loss masks (REFERENCE.md section 6).

Layout (Cerebras ModelZoo compatible): files `data-<chunk>.h5`, each with attribute `n_examples`, a dataset
`data` int32 (N, 4, MSL) whose rows are input_ids, loss_mask, labels (= input_ids shifted left by one) and
key_padding_mask (1 = do not attend), chunked (1, 4, MSL), and `img_path` (N, 1) bytes relative to the
image root (b"None" for text-only samples). `data_params.json` records settings, counts and statistics.

The loss mask is aligned with `labels`: position t is supervised when labels[t] is an answer token (or the
`</s>` closing an answer). Everything is written into a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from llava_core.config import PipelineConfig, partial_dir, replace_dir, write_json_atomic
from llava_core.images import ImageRejected, check_image, clip_transform, load_rgb
from llava_core.model import vision_geometry
from llava_core.prompts import PromptError, count_image_placeholders, encode_conversation
from llava_core.tokenizer import load_tokenizer

NO_IMAGE = b"None"
ROWS = ("input_ids", "loss_mask", "labels", "key_padding_mask")


@dataclass
class Hdf5Result:
    phase: str
    path: Path
    examples: int
    processed: int
    discarded: dict[str, int] = field(default_factory=dict)
    image_start_idx: int = 0


def example_rows(
    enc_ids: list[int], enc_loss: list[int], msl: int, pad_id: int, image_start: int, num_patches: int, has_image: bool
) -> np.ndarray:
    """Pack one encoded conversation into the (4, MSL) int32 block."""
    n = len(enc_ids)
    block = np.zeros((4, msl), dtype=np.int32)
    ids = np.full(msl, pad_id, dtype=np.int32)
    ids[:n] = enc_ids
    block[0] = ids
    loss = np.zeros(msl, dtype=np.int32)
    loss[: n - 1] = enc_loss[1:n]  # aligned with labels: labels[t] = ids[t + 1]
    block[1] = loss
    block[2, : msl - 1] = ids[1:]
    block[2, msl - 1] = pad_id
    kpm = np.zeros(msl, dtype=np.int32)
    kpm[n:] = 1
    if not has_image:
        kpm[image_start : image_start + num_patches] = 1
    block[3] = kpm
    return block


def build_hdf5(cfg: PipelineConfig, phase: str) -> Hdf5Result:
    """Tokenise the phase's jsonl files into HDF5 shards under `data/hdf5/<phase>/`."""
    if phase not in cfg.hdf5:
        raise KeyError(f"unknown phase {phase!r}; valid: {sorted(cfg.hdf5)}")
    hc = cfg.hdf5[phase]
    tok = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer))
    pad_id = tok.pad_token_id
    image_size, patch = vision_geometry(cfg)
    num_patches = (image_size // patch) ** 2
    msl = hc.max_sequence_length
    if msl <= num_patches + 2:
        raise ValueError(f"hdf5.{phase}.max_sequence_length {msl} leaves no room for text after {num_patches} patches")
    inputs = [cfg.jsonl_path(d) for d in cfg.datasets_for(phase)]
    if not inputs:
        raise ValueError(f"no dataset is configured for {phase}; add one under 'datasets' with phase: {phase}")

    discarded: Counter[str] = Counter()
    blocks: list[np.ndarray] = []
    paths: list[bytes] = []
    image_starts: set[int] = set()
    processed = 0
    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the conversion stage first")
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                processed += 1
                try:
                    rec = json.loads(line)
                    conv = rec["conversations"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    discarded["malformed_record"] += 1
                    continue
                image = rec.get("image")
                if image is not None and count_image_placeholders(conv) != 1:
                    discarded["image_placeholder_count"] += 1
                    continue
                if phase == "phase1" and image is None:
                    discarded["phase1_without_image"] += 1
                    continue
                try:
                    if image is not None:
                        check_image(cfg.image_root, image, hc.min_image_size)
                    enc = encode_conversation(conv, tok, hc.prompt_style, num_patches, pad_id)
                except (ImageRejected, PromptError) as e:
                    discarded[e.reason] += 1
                    continue
                if len(enc.input_ids) > msl:
                    discarded["longer_than_msl"] += 1
                    continue
                if sum(enc.loss_mask) == 0:
                    discarded["no_loss_tokens"] += 1
                    continue
                image_starts.add(enc.image_start)
                blocks.append(
                    example_rows(
                        enc.input_ids, enc.loss_mask, msl, pad_id, enc.image_start, num_patches, image is not None
                    )
                )
                paths.append(image.encode("utf-8") if image is not None else NO_IMAGE)
    if not blocks:
        raise ValueError(f"{phase}: no example survived ({dict(discarded)}) out of {processed} records")
    if len(image_starts) != 1:
        raise AssertionError(f"image slots start at several indices {sorted(image_starts)}; the model needs one")
    image_start = image_starts.pop()

    order = list(range(len(blocks)))
    random.Random(cfg.seed).shuffle(order)
    out = cfg.hdf5_dir(phase)
    tmp = partial_dir(out)
    files = []
    for chunk, start in enumerate(range(0, len(order), hc.shard_size)):
        idx = order[start : start + hc.shard_size]
        name = f"data-{chunk:05d}.h5"
        with h5py.File(tmp / name, "w") as h5:
            h5.attrs["n_examples"] = len(idx)
            h5.create_dataset("data", data=np.stack([blocks[i] for i in idx]), dtype="int32", chunks=(1, 4, msl))
            h5.create_dataset(
                "img_path",
                data=np.array([[paths[i]] for i in idx], dtype=object),
                dtype=h5py.string_dtype(encoding="utf-8"),
            )
        files.append({"file": name, "n_examples": len(idx)})

    data = np.stack(blocks)
    stats = {
        "num_tokens": int(data.shape[0] * msl),
        "non_pad_tokens": int((data[:, 3] == 0).sum()),
        "loss_valid_tokens": int(data[:, 1].sum()),
    }
    stats["supervised_fraction"] = stats["loss_valid_tokens"] / max(1, stats["non_pad_tokens"])
    params = {
        "phase": phase,
        "settings": {
            "prompt_style": hc.prompt_style,
            "max_sequence_length": msl,
            "shard_size": hc.shard_size,
            "min_image_size": hc.min_image_size,
            "tokenizer": cfg.model.tokenizer,
            "image_size": image_size,
            "patch_size": patch,
            "seed": cfg.seed,
            "inputs": [str(p) for p in inputs],
            "image_root": str(cfg.image_root),
        },
        "processed": processed,
        "discarded": sum(discarded.values()),
        "discarded_by_reason": dict(sorted(discarded.items())),
        "examples": len(blocks),
        "text_only_examples": sum(1 for p in paths if p == NO_IMAGE),
        "files": files,
        "eos_id": tok.eos_token_id,
        "pad_id": pad_id,
        "bos_id": tok.bos_token_id,
        "vocab_size": len(tok),
        "token_stats": stats,
        "image_patch_info": {"image_patch_start_idx": image_start, "num_patches": num_patches},
    }
    write_json_atomic(tmp / "data_params.json", params)
    replace_dir(tmp, out)
    return Hdf5Result(phase, out, len(blocks), processed, dict(discarded), image_start)


class LlavaHdf5Dataset(Dataset):
    """Random access over the shards of one HDF5 folder; each loader worker opens its own file handles."""

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

    def _file(self, k: int) -> h5py.File:
        import os

        if self._pid != os.getpid():  # forked into a worker: never share h5py handles across processes
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = h5py.File(self.files[k], "r")
        return self._handles[k]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
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
    batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    attended = batch["attention_mask"].any(dim=0).nonzero()
    length = int(attended.max()) + 1 if len(attended) else batch["input_ids"].shape[1]
    for k in ("input_ids", "loss_mask", "labels", "attention_mask"):
        batch[k] = batch[k][:, :length]
    return batch
