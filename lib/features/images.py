"""Image loading and the resize rules of step A (and of every query-side extraction).

Why a module of its own: the original (Caffe ``caffe.io.load_image`` + skimage resize)
silently mishandled odd files (16-bit, CMYK, palette transparency, EXIF rotation) and
had three different rules for square images. Here one function decodes every image the
same way and one rule decides the network input size:

* **Orientation**: portrait when ``height > width``; every other image, squares
  included, is landscape (the original's list builders).
* **resize = fixed** (the paper): anisotropic resize to ``input_size`` (given in
  portrait order, e.g. 336×256) for portrait images, to its transpose (256×336) for
  landscape images.
* **resize = max_side**: keep the aspect ratio, longer side = ``max_side`` (rounded).
* **resize = none**: the original size.

Resizing is bilinear with half-pixel centres (``align_corners=False``, skimage order 1)
and, as in the 2016 original, no antialiasing unless asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from lib.errors import UserError

log = logging.getLogger(__name__)

RESIZE_MODES = ("fixed", "max_side", "none")


class CorruptImageError(UserError):
    """An image file that cannot be decoded (zero bytes, truncated, not an image, too
    large). Step A lists it in ``corrupted.txt`` and goes on."""


def load_image(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Decode ``path`` to an 8-bit RGB image with its EXIF orientation applied.

    Grey, bilevel, CMYK and palette images are converted; alpha (including palette
    transparency) is composited over white so hidden colours never leak into features;
    16-/32-bit grey is scaled to 8 bits. ``max_pixels`` guards against decompression
    bombs. Raises :class:`CorruptImageError` naming the file and the reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise CorruptImageError(f"{path}: file not found") from None
    if size == 0:
        raise CorruptImageError(f"{path}: zero-byte file")
    old_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # our own guard below, with a clear message
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise CorruptImageError(
                    f"{path}: too large ({w}x{h} = {w * h} pixels > max_image_pixels "
                    f"{max_pixels})")
            im.load()
            img = _to_rgb(ImageOps.exif_transpose(im) or im)
    except CorruptImageError:
        raise
    except UnidentifiedImageError:
        raise CorruptImageError(f"{path}: not an image (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptImageError(f"{path}: unreadable or truncated ({reason})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    return img


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see :func:`load_image`)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy() if im.readonly else im
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        elif mode != "F":
            a = a / 257.0  # 0..65535 -> 0..255
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")
    if (mode == "P" and "transparency" in im.info) or mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def is_portrait(width: int, height: int) -> bool:
    """Portrait when strictly taller than wide; squares are landscape (the lists' rule)."""
    return height > width


def oriented(size_portrait: Sequence[int], portrait: bool) -> tuple[int, int]:
    """(H, W) of a portrait-order size for an image of the given orientation."""
    h, w = int(size_portrait[0]), int(size_portrait[1])
    return (h, w) if portrait else (w, h)


def target_size(width: int, height: int, resize: str, input_size: Sequence[int],
                max_side: int) -> tuple[int, int]:
    """Network input (H, W) for a ``width``×``height`` image under the ``resize`` rule."""
    if resize == "fixed":
        return oriented(input_size, is_portrait(width, height))
    if resize == "max_side":
        s = max_side / max(width, height)
        return max(1, round(height * s)), max(1, round(width * s))
    if resize == "none":
        return int(height), int(width)
    raise UserError(f"settings key 'resize': {resize!r} is not one of "
                    f"{', '.join(RESIZE_MODES)}")


def resize_image(img: Image.Image | np.ndarray, size_hw: Sequence[int],
                 antialias: bool) -> torch.Tensor:
    """uint8 (3, H, W) RGB tensor of ``img`` resized bilinearly to ``size_hw``.

    Half-pixel geometry (``align_corners=False``). Uses torch's uint8 channels-last
    kernel (within 1 grey level of the float computation, several times faster)."""
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image, got shape {a.shape} {a.dtype}")
    if not (a.flags.c_contiguous and a.flags.writeable):
        a = np.array(a, order="C")  # PIL arrays are read-only views
    t = torch.from_numpy(a).permute(2, 0, 1)  # a channels-last view, no copy
    h, w = int(size_hw[0]), int(size_hw[1])
    if (h, w) == tuple(t.shape[1:]):
        return t.contiguous()
    out = F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False,
                        antialias=antialias)
    return out[0].contiguous()
