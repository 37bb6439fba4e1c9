"""Image checks and the CLIP image transform shared by training, evaluation and prediction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from llava_core.data.image_cache import Decoded, ImageCheckCache, digest

if TYPE_CHECKING:  # torch is imported when a transform runs: the data stages never need it
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)


class ImageRejected(ValueError):
    """An image that cannot be used; `reason` is the counted rejection key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# What an extension claims; a file whose decoded format differs is used (PIL opens by content) and counted.
EXTENSION_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
FORMAT_MISMATCH = "format_differs_from_extension"
ANIMATED = "animated_first_frame_used"
UNDECODABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


@dataclass(frozen=True)
class ImageInfo:
    """An accepted image: its real path, decoded format and size, and notes worth counting (not rejections)."""

    path: Path
    format: str | None
    size: tuple[int, int]
    notes: tuple[str, ...] = ()


class ImageChecker:
    """Checks image paths relative to one image root; the root and folders are resolved once (many files).

    With a `cache` (llava_core/data/image_cache.py) a file whose bytes were decoded before, by any process, is not
    decoded again: its digest finds the verdict."""

    def __init__(self, image_root: Path, min_size: int = 1, cache: ImageCheckCache | None = None) -> None:
        self.root = Path(image_root).resolve()
        self._root = str(self.root)
        self.min_size = min_size
        self.cache = cache
        self.decoded = 0  # files this checker decoded (the others came from the cache)
        self._real_dirs: dict[str, str] = {}

    def _inside(self, real: str) -> bool:
        return real == self._root or real.startswith(self._root + os.sep)

    def resolve(self, rel: str, as_path: bool = True) -> Path | str:
        """The file for `rel`; absolute paths, `..` and links leaving the root are rejected."""
        return Path(self._resolve(rel)) if as_path else self._resolve(rel)

    def _resolve(self, rel: str) -> str:
        if not isinstance(rel, str) or not rel:
            raise ImageRejected("image_path_invalid", repr(rel))
        norm = os.path.normpath(rel)
        if os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep):
            raise ImageRejected("image_path_outside_root", rel)
        folder, name = os.path.split(norm)
        real_dir = self._real_dirs.get(folder)
        if real_dir is None:  # folders are few: resolve each once (links between folders included)
            real_dir = self._real_dirs[folder] = os.path.realpath(os.path.join(self.root, folder))
        path = os.path.join(real_dir, name)
        if os.path.islink(path):
            path = os.path.realpath(path)
        if not self._inside(path) or not self._inside(real_dir):
            raise ImageRejected("image_path_outside_root", rel)
        return path

    def _existing(self, rel: str) -> str:
        path = self._resolve(rel)
        if not os.path.isfile(path):
            raise ImageRejected("image_missing", rel)
        return path

    def check(self, rel: str) -> ImageInfo:
        """Resolve, open and fully decode (or find the verdict in the cache); reject missing, undecodable,
        oversized or too small files."""
        path = self._existing(rel)
        if self.cache is None:
            return self._verdict(rel, path, self._decode(path))
        key = digest(path)
        found = self.cache.get_one(key)
        if found is None:
            found = self._decode(path)
            self.cache.put({key: found}, flush=False)
        return self._verdict(rel, path, found)

    def check_many(self, rels: list[str]) -> list[ImageInfo | ImageRejected]:
        """`check` for many paths, the cache read and written once: an ImageInfo or the ImageRejected for each."""
        out: list[ImageInfo | ImageRejected | None] = [None] * len(rels)
        paths: dict[int, str] = {}
        for i, rel in enumerate(rels):
            try:
                paths[i] = self._existing(rel)
            except ImageRejected as e:
                out[i] = e
        keys = {i: digest(p) for i, p in paths.items()} if self.cache is not None else {}
        known = self.cache.get(list(keys.values())) if self.cache is not None else {}
        new: dict[bytes, Decoded] = {}
        for i, path in paths.items():
            key = keys.get(i)
            found = None if key is None else known.get(key, new.get(key))
            if found is None:
                found = self._decode(path)
                if key is not None:
                    new[key] = found
            try:
                out[i] = self._verdict(rels[i], path, found)
            except ImageRejected as e:
                out[i] = e
        if new and self.cache is not None:
            self.cache.put(new)
        return out  # type: ignore[return-value]

    def _decode(self, path: str) -> Decoded:
        """Open and decode the whole file: truncated files fail here, not hours into training."""
        self.decoded += 1
        try:
            with Image.open(path) as im:
                im.load()
                return Decoded(im.format, im.size[0], im.size[1], getattr(im, "n_frames", 1))
        except Image.DecompressionBombError as e:
            return Decoded(reason="image_too_large", detail=str(e))
        except UNDECODABLE as e:
            return Decoded(reason="image_undecodable", detail=str(e))

    def _verdict(self, rel: str, path: str, d: Decoded) -> ImageInfo:
        if d.reason is not None:
            raise ImageRejected(d.reason, f"{rel}: {d.detail}")
        w, h = d.width, d.height
        if min(w, h) < self.min_size:
            raise ImageRejected("image_too_small", f"{rel}: {w}x{h} < {self.min_size}")
        notes = []
        claimed = EXTENSION_FORMATS.get(os.path.splitext(rel)[1].lower())  # what the record claims
        if claimed is not None and d.format != claimed:
            notes.append(FORMAT_MISMATCH)
        if d.frames > 1:
            notes.append(ANIMATED)
        return ImageInfo(Path(path), d.format, (w, h), tuple(notes))


def resolve_image(image_root: Path, rel: str) -> Path:
    """The file for `rel` under `image_root`; absolute paths, `..` and links leaving the root are rejected."""
    return ImageChecker(image_root).resolve(rel)


def check_image(image_root: Path, rel: str, min_size: int = 1) -> Path:
    """Resolve, open and fully decode the image; reject missing, undecodable or too small files."""
    return ImageChecker(image_root, min_size).check(rel).path


def load_rgb(path: Path) -> Image.Image:
    """Open by content, not by extension (a GIF named .jpg decodes as the GIF it is), as RGB."""
    with Image.open(path) as im:
        im.seek(0)
        return im.convert("RGB")


def expand_to_square(img: Image.Image, fill: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def clip_transform(img: Image.Image, size: int) -> torch.Tensor:
    """LLaVA-1.5 'pad' transform: expand to square with the mean colour, bicubic resize, centre crop, normalise.

    Returns a float32 tensor (3, size, size).
    """
    img = expand_to_square(img.convert("RGB"))
    w, h = img.size
    scale = size / min(w, h)  # shortest edge -> size, then centre crop (a no-op after squaring)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    import torch

    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())
