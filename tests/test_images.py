"""Image loading oddities and the resize rules (lib/features/images.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lib.features.images import (
    CorruptImageError,
    is_portrait,
    load_image,
    oriented,
    resize_image,
    target_size,
)


def test_orientation_rule_squares_are_landscape():
    assert is_portrait(256, 336)
    assert not is_portrait(336, 256)
    assert not is_portrait(300, 300)
    assert oriented([336, 256], True) == (336, 256)
    assert oriented([336, 256], False) == (256, 336)


def test_target_size_modes():
    assert target_size(600, 800, "fixed", [336, 256], 1024) == (336, 256)
    assert target_size(800, 600, "fixed", [336, 256], 1024) == (256, 336)
    assert target_size(500, 500, "fixed", [336, 256], 1024) == (256, 336)
    assert target_size(2000, 1000, "max_side", [336, 256], 1024) == (512, 1024)
    assert target_size(300, 100, "max_side", [336, 256], 600) == (200, 600)  # upscales too
    assert target_size(123, 45, "none", [336, 256], 1024) == (45, 123)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :5] = 255  # a white band on the left
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (20, 40)  # width, height swapped
    arr = np.asarray(out)
    assert arr[:5].mean() > 200 and arr[-5:].mean() < 50  # left band is now on top


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "P", "I;16", "RGBA", "LA"])
def test_modes_become_rgb(tmp_path, mode):
    base = Image.fromarray(_rgb(12, 10))
    if mode == "I;16":
        g = (np.arange(120, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
        im = Image.fromarray(g)  # uint16 -> mode I;16
        expect = np.clip(np.rint(g / 257.0), 0, 255).astype(np.uint8)
    else:
        im = base.convert(mode)
        expect = None
    p = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    im.save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (10, 12)
    arr = np.asarray(out)
    if expect is not None:  # 16 bit scaled to 8, grey replicated
        assert np.array_equal(arr[..., 0], expect) and np.array_equal(arr[..., 2], expect)
    if mode in ("L", "1"):
        assert np.array_equal(arr[..., 0], arr[..., 1])


def test_alpha_and_palette_transparency_become_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 200  # hidden red under full transparency
    a[:4, :, 3] = 255
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    arr = np.asarray(load_image(tmp_path / "a.png"))
    assert (arr[4:] == 255).all() and (arr[:4] == [200, 0, 0]).all()
    p = Image.new("P", (6, 6), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    arr = np.asarray(load_image(tmp_path / "p.png"))
    assert (arr == 255).all()


def test_corrupt_files_raise_with_reason(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(CorruptImageError, match="zero-byte"):
        load_image(tmp_path / "zero.jpg")
    (tmp_path / "text.jpg").write_text("not an image at all")
    with pytest.raises(CorruptImageError, match="not an image"):
        load_image(tmp_path / "text.jpg")
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match="truncated"):
        load_image(tmp_path / "trunc.jpg")
    with pytest.raises(CorruptImageError, match="too large"):
        load_image(tmp_path / "full.jpg", max_pixels=64 * 63)
    with pytest.raises(CorruptImageError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    assert load_image(tmp_path / "full.jpg", max_pixels=64 * 64).size == (64, 64)


def test_resize_geometry_half_pixel_bilinear():
    a = np.zeros((1, 2, 3), np.uint8)
    a[0, 1] = 255
    out = resize_image(a, (1, 4), antialias=False)
    # sample positions (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 (clamped at the ends)
    assert out.dtype == torch.uint8 and out.shape == (3, 1, 4)
    assert np.allclose(out[0, 0].numpy(), [0, 63.75, 191.25, 255], atol=1)


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matches_float_reference(antialias):
    a = _rgb(97, 131, seed=3)
    out = resize_image(Image.fromarray(a), (40, 52), antialias)
    ref = F.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None].float(), size=(40, 52),
                        mode="bilinear", align_corners=False, antialias=antialias)[0]
    assert out.shape == (3, 40, 52)
    assert (out.float() - ref).abs().max() <= 1.0


def test_antialias_changes_downsizing_and_identity_is_exact():
    a = np.zeros((64, 64, 3), np.uint8)
    a[:, (np.arange(64) // 4) % 2 == 0] = 255  # 4-pixel stripes: bilinear x1/4 aliases
    plain = resize_image(a, (16, 16), False).float()
    smooth = resize_image(a, (16, 16), True).float()
    assert abs(smooth.mean().item() - 127.5) < 2 and plain.std() > smooth.std() + 50
    assert torch.equal(resize_image(a, (64, 64), False), torch.from_numpy(a).permute(2, 0, 1))
