"""Coordinate conversions between original-image pixels and feature-map cells.

Why one module: query boxes (step D's masks), re-ranking windows and the localisations
written for the report all move between the two frames; doing it in one place keeps the
rounding rules consistent. Images are resized anisotropically, so a map cell covers
``H0/h`` by ``W0/w`` original pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
Cells = tuple[int, int, int, int]  # r0, c0, r1, c1 in map cells, end exclusive


def box_to_cells(bbox: Box, orig_hw: Sequence[int], map_hw: Sequence[int]) -> Cells:
    """The box in map cells, rounded outward (floor of the start, ceil of the end), clipped
    to the map and at least one cell wide and high (the original's ``conver_bbx_mask``)."""
    x1, y1, x2, y2 = bbox
    sy, sx = map_hw[0] / orig_hw[0], map_hw[1] / orig_hw[1]
    r0 = min(max(math.floor(y1 * sy), 0), map_hw[0] - 1)
    c0 = min(max(math.floor(x1 * sx), 0), map_hw[1] - 1)
    r1 = max(min(math.ceil(y2 * sy), map_hw[0]), r0 + 1)
    c1 = max(min(math.ceil(x2 * sx), map_hw[1]), c0 + 1)
    return r0, c0, r1, c1


def cells_to_box(cells: Cells, orig_hw: Sequence[int], map_hw: Sequence[int]) -> Box:
    """A window of map cells as a box in original-image pixels (cell edges)."""
    r0, c0, r1, c1 = cells
    sy, sx = orig_hw[0] / map_hw[0], orig_hw[1] / map_hw[1]
    return (c0 * sx, r0 * sy, c1 * sx, r1 * sy)


def box_mask(bbox: Box, orig_hw: Sequence[int]) -> np.ndarray:
    """Binary float32 mask of the box at full resolution. Coordinates are truncated to
    integers and the end is exclusive (rows y1:y2, columns x1:x2), as the original did."""
    h, w = int(orig_hw[0]), int(orig_hw[1])
    x1, y1, x2, y2 = (int(v) for v in bbox)
    m = np.zeros((h, w), np.float32)
    m[max(y1, 0):max(min(y2, h), 0), max(x1, 0):max(min(x2, w), 0)] = 1.0
    return m


def resize_bilinear(arr: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
    """Bilinear resize with half-pixel centres and no antialiasing (skimage/Caffe
    geometry, used by the original for masks and weight maps)."""
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(int(out_hw[0]), int(out_hw[1])), mode="bilinear",
                        align_corners=False, antialias=False)
    return out[0, 0].numpy()


def box_is_valid(bbox: Box | None, orig_hw: Sequence[int]) -> str | None:
    """Why a query box cannot be used (None when it can): zero or negative area, or no
    overlap with the image."""
    if bbox is None:
        return None
    x1, y1, x2, y2 = bbox
    if not all(math.isfinite(v) for v in bbox):
        return f"box {list(bbox)} has non-finite coordinates"
    if x2 <= x1 or y2 <= y1:
        return f"box {list(bbox)} has zero or negative area"
    h, w = orig_hw
    if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
        return f"box {list(bbox)} lies outside the {w}x{h} image"
    if int(x2) - int(x1) <= 0 and int(y2) - int(y1) <= 0:
        return f"box {list(bbox)} covers no whole pixel"
    return None
