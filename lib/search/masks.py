"""Query boxes (or mask images) turned into per-cell weights on a feature map.

Why a module of its own: the BoW ranking (step D), the re-ranking and the pooling baseline
all need the same answer to "which map cells belong to the query object, and how much".
The four ``masking`` modes follow the original's ``D_rankings_BoW.py`` (spec §1.10):

- 0: ``None`` - every word counts (global search, GS);
- 1: the full-resolution box mask, resized bilinearly to the map and thresholded at
  ``> 0.5`` (local search, LS). The pooling baseline uses the soft (unthresholded) mask;
- 2: the box rounded outward to whole map cells (``geometry.box_to_cells``);
- 3: the exact Euclidean distance transform of the background at full resolution,
  ``1 - d / d_max`` (1 inside the box, 0 at the farthest pixel), resized bilinearly to the
  map. A box covering the whole image gives all ones (the original divided by zero).

A query without a box (``bbox is None`` and no mask image) has no object to select, so
every mode returns ``None`` (all words) for it; SMVS queries are whole photos.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from lib.errors import UserError
from lib.search.geometry import Box, box_is_valid, box_mask, box_to_cells, resize_bilinear

log = logging.getLogger(__name__)

MODES = (0, 1, 2, 3)


def check_box(bbox: Box | None, orig_hw: Sequence[int], query: str) -> None:
    """Refuse a box that selects nothing (zero area, outside the image, non-finite)."""
    why = box_is_valid(bbox, orig_hw)
    if why is not None:
        raise UserError(f"query '{query}': {why}")


def mask_bounds(mask: np.ndarray) -> Box | None:
    """Bounding box (x1, y1, x2, y2; end exclusive) of a binary mask's foreground, or
    ``None`` when it is empty (used for masking 2 and re-ranking with mask images)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def distance_weights(fg: np.ndarray) -> np.ndarray:
    """``1 - d/d_max`` with ``d`` the exact Euclidean distance of each pixel to the nearest
    foreground pixel; all ones when there is no background (no division by zero)."""
    fg = np.asarray(fg) > 0
    if fg.all() or not fg.any():
        return np.ones(fg.shape, np.float32)
    d = ndimage.distance_transform_edt(~fg)
    return (1.0 - d / d.max()).astype(np.float32)


def _box_pixels(bbox: Box, orig_hw: Sequence[int]) -> np.ndarray:
    """The original's truncated box mask, widened to whole pixels when truncation leaves it
    empty (a valid box thinner than one pixel must still select something)."""
    m = box_mask(bbox, orig_hw)
    if not m.any():
        x1, y1, x2, y2 = bbox
        m = box_mask((math.floor(x1), math.floor(y1), max(math.ceil(x2), math.floor(x1) + 1),
                      max(math.ceil(y2), math.floor(y1) + 1)), orig_hw)
    return m


def query_weights(
    mode: int,
    bbox: Box | None,
    orig_hw: Sequence[int],
    map_hw: Sequence[int],
    *,
    pooling: bool = False,
    mask: np.ndarray | None = None,
    query: str = "query",
) -> np.ndarray | None:
    """Weights (``map_hw``, float32) of the query's map cells for masking ``mode``.

    ``orig_hw`` is the image size the box refers to; ``map_hw`` the assignment (or feature)
    map of that image, already in the image's orientation. ``mask`` (full resolution,
    non-zero = object) replaces the box where the benchmark gives mask images (TRECVid).
    ``pooling`` selects the pooling baseline's variant: mode 1 stays soft. Returns ``None``
    when every cell counts with weight 1 (mode 0, or no box). A box that selects nothing
    raises UserError naming ``query``; a valid box too small to survive the 0.5 threshold
    falls back to its cells (mode 2) with a warning instead of an empty query."""
    if mode not in MODES:
        raise UserError(f"masking {mode!r} is not one of {MODES}")
    h0, w0 = int(orig_hw[0]), int(orig_hw[1])
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (h0, w0):
            raise UserError(f"query '{query}': mask of shape {mask.shape} does not match the "
                            f"{w0}x{h0} image")
        if not (mask > 0).any():
            raise UserError(f"query '{query}': the mask image is empty")
    else:
        check_box(bbox, orig_hw, query)
    if mode == 0 or (bbox is None and mask is None):
        return None
    fg = (mask > 0).astype(np.float32) if mask is not None else _box_pixels(bbox, (h0, w0))
    if mode == 1:
        soft = resize_bilinear(fg, map_hw)
        if pooling:
            return soft.astype(np.float32)
        hard = (soft > 0.5).astype(np.float32)
        if hard.any():
            return hard
        log.warning("query '%s': box smaller than half a map cell; using its cells "
                    "(masking 2) instead", query)
        mode = 2
    if mode == 2:
        bounds = mask_bounds(fg) if mask is not None else bbox
        r0, c0, r1, c1 = box_to_cells(bounds, (h0, w0), map_hw)
        out = np.zeros((int(map_hw[0]), int(map_hw[1])), np.float32)
        out[r0:r1, c0:c1] = 1.0
        return out
    # mode 3: distance transform of the background at full resolution, then resized
    return np.clip(resize_bilinear(distance_weights(fg), map_hw), 0.0, 1.0).astype(np.float32)
