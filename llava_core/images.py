"""Image checks and the CLIP image transform shared by training, evaluation and prediction."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

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


def resolve_image(image_root: Path, rel: str) -> Path:
    """The file for `rel` under `image_root`; absolute paths, `..` and links leaving the root are rejected."""
    if not isinstance(rel, str) or not rel:
        raise ImageRejected("image_path_invalid", repr(rel))
    if os.path.isabs(rel):
        raise ImageRejected("image_path_outside_root", rel)
    root = image_root.resolve()
    path = (root / rel).resolve()
    if path != root and root not in path.parents:
        raise ImageRejected("image_path_outside_root", rel)
    return path


def check_image(image_root: Path, rel: str, min_size: int = 1) -> Path:
    """Resolve, open and fully decode the image; reject missing, undecodable or too small files."""
    path = resolve_image(image_root, rel)
    if not path.is_file():
        raise ImageRejected("image_missing", rel)
    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: truncated files fail here, not hours into training
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageRejected("image_undecodable", f"{rel}: {e}") from None
    if min(w, h) < min_size:
        raise ImageRejected("image_too_small", f"{rel}: {w}x{h} < {min_size}")
    return path


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
