"""R-MAC: regional maximum activations of convolutions (Tolias, Sicre, Jégou, ICLR 2016).

Why here: the issue-10 line adds a learned global descriptor next to BoW; the same region
grid serves D_rankings_Pooling (``pooling = rmac``, numpy) and the trainable head of
:mod:`lib.learned.triplet` (torch), so both use :func:`rmac_regions`.

Region rule (documented in docs/learned.md, tested in tests/test_rmac.py). For an ``h``×``w``
map with short side ``m = min(h, w)`` and long side ``M = max(h, w)``:

* Extra regions along the long side: ``d`` in 1..6 minimising
  ``|(m - (M - m)/d) / m - 0.4|``, i.e. at level 1 the ``d + 1`` full-height squares
  overlap by the fraction closest to 40 %; ``d = 0`` for square maps.
* Level ``l`` (1..L): square regions of side ``s_l = max(1, floor(2m / (l + 1)))``;
  ``l`` positions along the short side and ``l + d`` along the long side. Positions
  are evenly spaced from 0 to ``size - s_l`` and floored: start
  ``floor(i * (size - s_l) / (n - 1))`` (``n = 1``: start 0). So level 1 holds
  ``d + 1`` squares of side ``m`` covering the whole map; a square map's level 1 is the
  whole map (the MAC vector).
* Regions are listed level by level, row-major (rows outer, columns inner), as
  ``(r0, c0, r1, c1)`` with ``r1``/``c1`` exclusive. Duplicates (tiny maps) are kept:
  they just weigh a region twice, as in the reference implementation.

Aggregation (:func:`rmac`): per region max-pool → L2 → PCA-whitening (any object with
``.transform``; fit on the database's region vectors with :func:`fit_rmac_pca`) → L2,
sum over regions, L2.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import numpy as np

from lib.features.local_features import l2n

if TYPE_CHECKING:
    from lib.vocabulary.pca import PCAWhitening

log = logging.getLogger(__name__)

OVERLAP = 0.4
MAX_EXTRA = 6  # the reference implementation's steps 2..7 → 1..6 extra regions
EPS = 1e-12


class Transform(Protocol):
    def transform(self, x: np.ndarray) -> np.ndarray: ...


def extra_regions(h: int, w: int, overlap: float = OVERLAP) -> int:
    """How many regions more than ``l`` lie along the long side (0 for square maps)."""
    m, big = min(h, w), max(h, w)
    if big == m:
        return 0
    d = np.arange(1, MAX_EXTRA + 1, dtype=np.float64)
    ovr = (m - (big - m) / d) / m
    return int(d[np.argmin(np.abs(ovr - overlap))])


def _starts(size: int, side: int, n: int) -> np.ndarray:
    if n <= 1:
        return np.zeros(1, np.int64)
    return np.floor(np.arange(n) * (size - side) / (n - 1)).astype(np.int64)


def rmac_regions(h: int, w: int, L: int = 3) -> np.ndarray:
    """All R-MAC regions of an ``h``×``w`` map as an (n, 4) int array ``(r0, c0, r1, c1)``
    (end exclusive), levels 1..L in order; the rule is in the module docstring."""
    if h < 1 or w < 1 or L < 1:
        raise ValueError(f"rmac_regions needs h, w, L >= 1, got {h}, {w}, {L}")
    m = min(h, w)
    d = extra_regions(h, w)
    out = []
    for level in range(1, L + 1):
        side = max(1, (2 * m) // (level + 1))
        nr = level + (d if h > w else 0)
        nc = level + (d if w > h else 0)
        r0 = _starts(h, side, nr)
        c0 = _starts(w, side, nc)
        rr, cc = np.meshgrid(r0, c0, indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        out.append(np.stack([rr, cc, rr + side, cc + side], axis=1))
    return np.concatenate(out).astype(np.int64)


def rmac_region_vectors(maps: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Max-pool a (C, h, w) map over each region → (n, C) float32.

    Vectorised per region *size*: every level's regions share one side, so a level is
    one strided sliding-window max (no Python loop over cells)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"expected a (C, h, w) map, got shape {maps.shape}")
    regions = np.asarray(regions, dtype=np.int64)
    out = np.empty((len(regions), maps.shape[0]), np.float32)
    sides = regions[:, 2] - regions[:, 0]
    for side in np.unique(sides):
        sel = np.flatnonzero(sides == side)
        s = int(side)
        # (C, h-s+1, w-s+1) max over every s×s window, then pick the region starts
        win = np.lib.stride_tricks.sliding_window_view(maps, (s, s), axis=(1, 2))
        pooled = win.max(axis=(-2, -1))
        out[sel] = pooled[:, regions[sel, 0], regions[sel, 1]].T
    return out


def rmac(maps: np.ndarray, L: int = 3, pca: Transform | None = None,
         weights: np.ndarray | None = None) -> np.ndarray:
    """The R-MAC vector of one (C, h, w) map: per region max → L2 → PCA-whitening (when
    given) → L2, sum, L2. ``weights`` (h, w) multiply the map first (query box masks of
    D); regions that end up all zero contribute nothing."""
    maps = np.asarray(maps, dtype=np.float32)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float32)
        if weights.shape != maps.shape[1:]:
            raise ValueError(f"weights shape {weights.shape} != map shape {maps.shape[1:]}")
        maps = maps * weights[None]
    regions = rmac_regions(maps.shape[1], maps.shape[2], L)
    v = rmac_region_vectors(maps, regions)
    alive = np.linalg.norm(v, axis=1) > EPS
    v = l2n(v[alive])
    if pca is not None and len(v):
        v = l2n(np.asarray(pca.transform(v), dtype=np.float32))
    if not len(v):
        dim = maps.shape[0] if pca is None else np.asarray(
            pca.transform(np.zeros((1, maps.shape[0]), np.float32))).shape[1]
        return np.zeros(dim, np.float32)
    return l2n(v.sum(axis=0)).astype(np.float32)


def region_vectors_for_pca(maps: np.ndarray, L: int = 3) -> np.ndarray:
    """The L2-normalised region vectors of one map: what :func:`fit_rmac_pca` is fit on
    (stack them over the database images)."""
    maps = np.asarray(maps, dtype=np.float32)
    v = rmac_region_vectors(maps, rmac_regions(maps.shape[1], maps.shape[2], L))
    v = v[np.linalg.norm(v, axis=1) > EPS]
    return l2n(v)


def affine_of(pca: Transform, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with ``pca.transform(x) == x @ W.T + b`` for any affine ``.transform``
    (PCA-whitening is one): read off by transforming 0 and the unit vectors. This is how
    the trainable head of :mod:`lib.learned.triplet` starts as exactly the untrained R-MAC."""
    b = np.asarray(pca.transform(np.zeros((1, channels), np.float32)), np.float64)[0]
    W = np.asarray(pca.transform(np.eye(channels, dtype=np.float32)), np.float64) - b
    return W.T.astype(np.float32), b.astype(np.float32)


def fit_rmac_pca(region_vectors: np.ndarray, dim: int, whiten: bool = True) -> PCAWhitening:
    """PCA-whitening (:class:`lib.vocabulary.pca.PCAWhitening`) for R-MAC, fit on region vectors
    stacked over the database (:func:`region_vectors_for_pca` per image). Rows are
    L2-normalised here, so raw max-pooled vectors are fine too. ``dim`` is capped at the
    rank (channels, and regions - 1): whitening a null direction would blow it up."""
    from lib.vocabulary.pca import PCAWhitening

    x = l2n(np.asarray(region_vectors, np.float32))
    x = x[np.linalg.norm(x, axis=1) > 0.5]
    if len(x) < 2:
        raise ValueError(f"R-MAC PCA needs at least 2 non-zero region vectors, got {len(x)}")
    cap = min(dim, x.shape[1], len(x) - 1)
    if cap < dim:
        log.warning("R-MAC PCA: dim %d capped to %d (%d region vectors of %d channels)",
                    dim, cap, len(x), x.shape[1])
    return PCAWhitening.fit(x, cap, whiten)
