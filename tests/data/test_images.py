"""Image checks and the CLIP 'pad' transform (docs/formats.md, the loader image transform)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from llava_core.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    PAD_COLOR,
    ImageRejected,
    check_image,
    clip_transform,
    expand_to_square,
    load_rgb,
    resolve_image,
)
from tests.helpers_unit import write_png, write_truncated_png


def test_pad_colour_is_reference_mean():
    assert PAD_COLOR == (122, 116, 104)


@pytest.mark.parametrize("size", [32, 48])
def test_clip_transform_wide_image_pads_with_mean(size):
    # 64x16 pure red band: squared to 64x64, the band occupies rows 24..39, rows 0..23 and 40..63 are padding
    img = Image.new("RGB", (64, 16), (255, 0, 0))
    x = clip_transform(img, size)
    assert isinstance(x, torch.Tensor)
    assert x.dtype == torch.float32
    assert x.shape == (3, size, size)
    scale = size / 64
    border = int(20 * scale)  # stay clear of bicubic ringing at the band edge (row 24 * scale)
    top, bottom = x[:, :border, :], x[:, size - border :, :]
    for region in (top, bottom):
        assert region.abs().max().item() < 0.02  # the mean colour normalises to ~0
    # the band centre is the normalised red
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    centre = x[:, size // 2, size // 2]
    assert torch.allclose(centre, red, atol=0.02)


def test_clip_transform_tall_image_pads_left_and_right():
    img = Image.new("RGB", (10, 40), (0, 0, 255))
    x = clip_transform(img, 32)
    assert x.shape == (3, 32, 32)
    assert x[:, :, :8].abs().max().item() < 0.02
    assert x[:, :, -8:].abs().max().item() < 0.02
    blue = (torch.tensor([0.0, 0.0, 1.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[:, 16, 16], blue, atol=0.02)


def test_clip_transform_square_resize_and_grey_input():
    img = Image.new("L", (100, 100), 255)  # grey input converts to RGB
    x = clip_transform(img, 24)
    assert x.shape == (3, 24, 24)
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x, white.view(3, 1, 1).expand(3, 24, 24), atol=1e-4)


def test_expand_to_square_centres_the_image():
    img = Image.new("RGB", (6, 2), (0, 0, 0))
    sq = np.asarray(expand_to_square(img))
    assert sq.shape == (6, 6, 3)
    assert (sq[2:4] == 0).all()
    assert (sq[:2] == PAD_COLOR).all() and (sq[4:] == PAD_COLOR).all()
    same = Image.new("RGB", (5, 5))
    assert expand_to_square(same) is same


@pytest.mark.parametrize("rel", ["../x.png", "a/../../x.png", "/etc/passwd", os.path.abspath("/tmp/x.png")])
def test_resolve_rejects_paths_leaving_root(tmp_path, rel):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ImageRejected) as ei:
        resolve_image(root, rel)
    assert ei.value.reason == "image_path_outside_root"


def test_resolve_rejects_symlink_leaving_root(tmp_path):
    root = tmp_path / "root"
    outside = write_png(tmp_path / "outside" / "secret.png")
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "link.png").symlink_to(outside)
    with pytest.raises(ImageRejected) as ei:
        resolve_image(root, "imgs/link.png")
    assert ei.value.reason == "image_path_outside_root"
    with pytest.raises(ImageRejected) as ei:
        check_image(root, "imgs/link.png")
    assert ei.value.reason == "image_path_outside_root"


def test_resolve_accepts_inside_paths(tmp_path):
    root = tmp_path / "root"
    target = write_png(root / "a" / "b.png")
    assert resolve_image(root, "a/b.png") == target.resolve()
    assert resolve_image(root, "a/../a/b.png") == target.resolve()
    # a symlink that stays inside the root is fine
    (root / "inside.png").symlink_to(target)
    assert resolve_image(root, "inside.png") == target.resolve()


@pytest.mark.parametrize("rel", ["", None])
def test_resolve_rejects_empty(tmp_path, rel):
    with pytest.raises(ImageRejected) as ei:
        resolve_image(tmp_path, rel)
    assert ei.value.reason == "image_path_invalid"


def test_gif_named_jpg_decodes(tmp_path):
    path = tmp_path / "pic.jpg"
    Image.new("P", (20, 12), 3).save(path, format="GIF")
    assert path.read_bytes()[:3] == b"GIF"
    assert check_image(tmp_path, "pic.jpg", min_size=8) == path.resolve()
    img = load_rgb(path)
    assert img.mode == "RGB"
    assert img.size == (20, 12)


def test_load_rgb_converts_rgba_and_grey(tmp_path):
    Image.new("RGBA", (5, 7), (1, 2, 3, 4)).save(tmp_path / "a.png")
    Image.new("L", (3, 3), 9).save(tmp_path / "g.png")
    a = load_rgb(tmp_path / "a.png")
    assert a.mode == "RGB" and a.size == (5, 7) and a.getpixel((0, 0)) == (1, 2, 3)
    assert load_rgb(tmp_path / "g.png").getpixel((1, 1)) == (9, 9, 9)


def test_truncated_png_is_undecodable(tmp_path):
    write_truncated_png(tmp_path / "t.png")
    with pytest.raises(ImageRejected) as ei:
        check_image(tmp_path, "t.png")
    assert ei.value.reason == "image_undecodable"
    assert "t.png" in str(ei.value)


def test_garbage_file_is_undecodable(tmp_path):
    (tmp_path / "g.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageRejected) as ei:
        check_image(tmp_path, "g.png")
    assert ei.value.reason == "image_undecodable"


def test_missing_image(tmp_path):
    with pytest.raises(ImageRejected) as ei:
        check_image(tmp_path, "nope.png")
    assert ei.value.reason == "image_missing"
    (tmp_path / "dir.png").mkdir()  # a folder is not an image file
    with pytest.raises(ImageRejected) as ei:
        check_image(tmp_path, "dir.png")
    assert ei.value.reason == "image_missing"


def test_too_small_image(tmp_path):
    write_png(tmp_path / "s.png", size=(4, 4))
    with pytest.raises(ImageRejected) as ei:
        check_image(tmp_path, "s.png", min_size=8)
    assert ei.value.reason == "image_too_small"
    assert "4x4 < 8" in str(ei.value)
    # the shorter side counts
    write_png(tmp_path / "w.png", size=(100, 7))
    with pytest.raises(ImageRejected) as ei:
        check_image(tmp_path, "w.png", min_size=8)
    assert ei.value.reason == "image_too_small"
    write_png(tmp_path / "ok.png", size=(8, 8))
    assert check_image(tmp_path, "ok.png", min_size=8) == (tmp_path / "ok.png").resolve()


@pytest.mark.parametrize(("size", "shape"), [(32, (50, 30)), (24, (17, 90)), (336, (640, 480)), (32, (32, 32))])
def test_clip_transform_equals_llava_expand2square_then_clip_processor(size, shape):
    """The numbers LLaVA's own preprocessing gives: expand2square, then the CLIP image processor."""
    from transformers import CLIPImageProcessorPil

    pixels = np.random.default_rng(size).integers(0, 256, (shape[1], shape[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    reference = processor(expand_to_square(img), return_tensors="pt")["pixel_values"][0]
    ours = clip_transform(img, size)
    assert ours.shape == reference.shape == (3, size, size)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_checker_notes_format_mismatch_and_animation(tmp_path):
    from llava_core.data.images import ANIMATED, FORMAT_MISMATCH, ImageChecker

    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.jpg", format="GIF", save_all=True, append_images=frames[1:])
    Image.new("RGB", (16, 16)).save(tmp_path / "real.png")
    checker = ImageChecker(tmp_path, min_size=8)
    info = checker.check("anim.jpg")
    assert (info.format, info.size, info.notes) == ("GIF", (16, 16), (FORMAT_MISMATCH, ANIMATED))
    assert checker.check("real.png").notes == ()


def test_decompression_bomb_is_rejected(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # 4x the limit: PIL refuses to open it
    with pytest.raises(ImageRejected) as ei:
        check_image(tmp_path, "big.png")
    assert ei.value.reason == "image_too_large"
