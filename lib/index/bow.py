"""Bag-of-words vectors from assignment maps, and the sparse-vector helpers.

A sparse vector is a pair ``(idx, val)``: ``idx`` int32, sorted and unique word ids,
``val`` float32 of the same length. Every BoW vector in this project (database rows,
queries, re-ranking windows, expanded queries) is L2-normalised in this form.
"""

from __future__ import annotations

import numpy as np

SparseVec = tuple[np.ndarray, np.ndarray]

EMPTY: SparseVec = (np.zeros(0, np.int32), np.zeros(0, np.float32))


def centre_prior(h: int, w: int) -> np.ndarray:
    """The paper's centre prior on an ``h``×``w`` map: ``1 - d/d_max`` with ``d`` the
    Euclidean distance in cells from ``(h//2, w//2)`` and ``d_max`` the largest such
    distance on the grid. Orientation-aware by construction (pass the map's own h, w)."""
    r = np.arange(h, dtype=np.float64)[:, None] - h // 2
    c = np.arange(w, dtype=np.float64)[None, :] - w // 2
    d = np.sqrt(r * r + c * c)
    dmax = d.max()
    if dmax == 0:
        return np.ones((h, w), np.float32)
    return (1.0 - d / dmax).astype(np.float32)


def bow_vector(words: np.ndarray, n_words: int, weights: np.ndarray | None = None,
               normalise: bool = True) -> SparseVec:
    """Histogram of ``words`` (any shape), each occurrence weighted by ``weights`` (same
    shape; ``None`` = counts), L2-normalised. Entries with zero weight are dropped."""
    w = np.asarray(words).ravel()
    if w.size and (w.min() < 0 or w.max() >= n_words):
        raise ValueError(f"word ids must lie in [0, {n_words})")
    if weights is None:
        hist = np.bincount(w, minlength=n_words)
    else:
        hist = np.bincount(w, weights=np.asarray(weights, np.float64).ravel(),
                           minlength=n_words)
    idx = np.flatnonzero(hist > 0).astype(np.int32)
    val = hist[idx].astype(np.float64)
    if normalise:
        n = np.sqrt(np.dot(val, val))
        if n > 0:
            val = val / n
    return idx, val.astype(np.float32)


def l2_normalise(v: SparseVec) -> SparseVec:
    idx, val = v
    n = float(np.sqrt(np.dot(val.astype(np.float64), val)))
    return (idx, (val / n).astype(np.float32)) if n > 0 else (idx, val.astype(np.float32))


def sparse_sum(vectors: list[SparseVec], weights: list[float] | None = None) -> SparseVec:
    """Weighted sum of sparse vectors (not normalised)."""
    if not vectors:
        return EMPTY
    weights = weights or [1.0] * len(vectors)
    idx = np.concatenate([v[0] for v in vectors]).astype(np.int64)
    val = np.concatenate([v[1].astype(np.float64) * w for v, w in zip(vectors, weights)])
    if idx.size == 0:
        return EMPTY
    uniq, inv = np.unique(idx, return_inverse=True)
    out = np.zeros(uniq.size, np.float64)
    np.add.at(out, inv, val)
    keep = out != 0
    return uniq[keep].astype(np.int32), out[keep].astype(np.float32)


def sparse_dot(a: SparseVec, b: SparseVec) -> float:
    common, ia, ib = np.intersect1d(a[0], b[0], assume_unique=True, return_indices=True)
    if common.size == 0:
        return 0.0
    return float(np.dot(a[1][ia].astype(np.float64), b[1][ib]))


def to_dense(v: SparseVec, n_words: int) -> np.ndarray:
    out = np.zeros(n_words, np.float32)
    out[v[0]] = v[1]
    return out


def from_dense(x: np.ndarray) -> SparseVec:
    idx = np.flatnonzero(x).astype(np.int32)
    return idx, x[idx].astype(np.float32)
