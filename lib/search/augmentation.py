"""Query augmentation: the views of a query image, and its box and mask moved with them.

Why a module of its own: the encoder (:mod:`lib.search.query_encoding`) transforms the
image, the box and the mask image of every view, and the three must agree pixel for pixel
(tests/test_queries.py paints a box and checks it lands where :func:`transform_box` says).

The ``augmentation`` setting is cumulative (spec §1.10): 0 the image; 1 + its horizontal
flip; 2 + the 1.5x centre crop (the image resized by 1.5, then the centred crop of the
original size, integer offsets); 3 + the flipped crop (the crop of the flipped image).
Boxes and mask images move with the image; a view whose box leaves the crop contributes
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lib.search.geometry import Box, resize_bilinear

ZOOM = 1.5  # the original's get_center_crop(p=0.5)


@dataclass(frozen=True)
class Variant:
    """One augmented view of a query: optional horizontal flip, then optional zoom."""

    name: str
    flip: bool = False
    zoom: float = 1.0


VARIANTS: tuple[Variant, ...] = (
    Variant("orig"), Variant("flip", flip=True), Variant("crop", zoom=ZOOM),
    Variant("flipcrop", flip=True, zoom=ZOOM),
)


def variants_for(augmentation: int) -> tuple[Variant, ...]:
    """The views used for ``augmentation`` 0-3 (cumulative: 2 = image, flip and crop)."""
    if augmentation not in (0, 1, 2, 3):
        raise ValueError(f"augmentation must be 0-3, got {augmentation!r}")
    return VARIANTS[: augmentation + 1]


def crop_geometry(h: int, w: int, zoom: float) -> tuple[int, int, int, int]:
    """``(nh, nw, oy, ox)``: the zoomed size and the integer offset of the centred crop of
    size ``(h, w)`` inside it (the original indexed with floats, which modern numpy
    rejects)."""
    nh, nw = max(round(h * zoom), h), max(round(w * zoom), w)
    return nh, nw, (nh - h) // 2, (nw - w) // 2


def transform_box(box: Box, v: Variant, hw: Sequence[int]) -> Box | None:
    """The box (x1, y1, x2, y2; pixel edges) in the view ``v`` of an ``hw`` image, clipped
    to it; ``None`` when nothing of it is left in the view."""
    h, w = int(hw[0]), int(hw[1])
    x1, y1, x2, y2 = (float(c) for c in box)
    if v.flip:
        x1, x2 = w - x2, w - x1
    if v.zoom != 1.0:
        nh, nw, oy, ox = crop_geometry(h, w, v.zoom)
        sy, sx = nh / h, nw / w
        x1, x2 = x1 * sx - ox, x2 * sx - ox
        y1, y2 = y1 * sy - oy, y2 * sy - oy
    x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
    y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
    if x2 - x1 <= 0 or y2 - y1 <= 0 or (int(x2) - int(x1) <= 0 and int(y2) - int(y1) <= 0):
        return None
    return x1, y1, x2, y2


def transform_image(img: Image.Image, v: Variant) -> Image.Image:
    """The view ``v`` of a PIL image (same size as the input)."""
    if v.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if v.zoom != 1.0:
        w, h = img.size
        nh, nw, oy, ox = crop_geometry(h, w, v.zoom)
        img = img.resize((nw, nh), Image.Resampling.BILINEAR).crop((ox, oy, ox + w, oy + h))
    return img


def transform_mask(mask: np.ndarray, v: Variant) -> np.ndarray:
    """The view ``v`` of a full-resolution binary mask (bilinear zoom, threshold 0.5)."""
    m = np.asarray(mask, np.float32)
    if v.flip:
        m = m[:, ::-1]
    if v.zoom != 1.0:
        h, w = m.shape
        nh, nw, oy, ox = crop_geometry(h, w, v.zoom)
        m = (resize_bilinear(m, (nh, nw))[oy:oy + h, ox:ox + w] > 0.5).astype(np.float32)
    return np.ascontiguousarray(m)
