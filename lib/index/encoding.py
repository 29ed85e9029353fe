"""From feature maps to words and from words to a database BoW vector.

Why a module of its own: step C (database), step D (queries, re-ranking windows) and the
streaming path of step A must turn maps into words and words into vectors in exactly the
same way; any drift between them silently lowers mAP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lib.errors import UserError
from lib.index.bow import SparseVec, bow_vector, centre_prior
from lib.vocabulary.codebook import Codebook
from lib.vocabulary.pca import PCAWhitening

WEIGHTINGS = ("centre_prior", "counts")


def strongest_cells(strength: np.ndarray, fraction: float) -> np.ndarray:
    """bool mask (same shape): the cells among the ``fraction`` strongest of one image
    (``keep_cells``). ``k = max(1, round(fraction * n))`` cells are wanted; every cell at
    least as strong as the k-th strongest is kept (ties at the threshold stay together,
    so the same map always gives the same mask). ``fraction >= 1`` keeps every cell."""
    s = np.asarray(strength)
    if fraction >= 1.0 or s.size == 0:
        return np.ones(s.shape, bool)
    k = max(1, round(float(fraction) * s.size))
    thr = np.partition(s.ravel(), s.size - k)[s.size - k]
    return s >= thr


def cell_strength(maps: np.ndarray) -> np.ndarray:
    """(H, W) float32: the L2 norm of each cell's raw feature over the channels of the
    (C, H, W) maps the words are assigned on (before L2 and PCA): the activation
    strength ``keep_cells`` ranks cells by."""
    m = np.asarray(maps)
    return np.sqrt(np.sum(np.square(m, dtype=np.float64), axis=0)).astype(np.float32)


def drop_weak_cells(words: np.ndarray, strength: np.ndarray, fraction: float,
                    n_words: int) -> np.ndarray:
    """``words`` (any shape, int) with the cells outside :func:`strongest_cells` set to
    ``n_words``, the map's "no word" id (a copy when any cell is dropped)."""
    keep = strongest_cells(strength, fraction).reshape(np.shape(words))
    if keep.all():
        return words
    return np.where(keep, words, n_words)


def word_dtype(k: int) -> np.dtype:
    """Smallest unsigned type that holds word ids 0..k-1 (uint16 up to 65,536 words)."""
    return np.dtype(np.uint16) if k <= 65536 else np.dtype(np.uint32)


def map_dtype(k: int, keep_cells: float) -> np.dtype:
    """The stored word map's type: :func:`word_dtype` of ``k`` words, plus room for the
    "no word" id ``k`` when ``keep_cells`` drops cells."""
    return word_dtype(k + 1 if keep_cells < 1.0 else k)


def words_from_maps(maps: np.ndarray, pca: PCAWhitening, codebook: Codebook,
                    l2norm: bool = True, keep_cells: float = 1.0) -> np.ndarray:
    """Assignment map (H, W) int64 of already-upsampled maps (C, H, W): row-major local
    features -> L2 -> PCA -> L2 -> nearest word; with ``keep_cells`` < 1 the weaker
    cells hold ``codebook.k`` (:func:`drop_weak_cells`)."""
    from lib.features.local_features import maps_to_features

    if maps.ndim != 3:
        raise ValueError(f"expected maps of shape (C, H, W), got {maps.shape}")
    _, h, w = maps.shape
    feats = maps_to_features(maps, l2norm, pca)
    words = codebook.assign(feats).reshape(h, w)
    if keep_cells < 1.0:
        words = drop_weak_cells(words, cell_strength(maps), keep_cells, codebook.k)
    return words


def database_vector(words: np.ndarray, weighting: str, n_words: int) -> SparseVec:
    """L2-normalised BoW of one assignment map: per word, the sum of the centre prior of
    its cells (the paper's Oxford/Paris database encoding; the prior is taken on the
    map's own (H, W), so landscape maps get the transposed prior) or plain counts. Cells
    holding ``n_words`` (no word: dropped by ``keep_cells``) add nothing."""
    words = np.asarray(words)
    if words.ndim != 2:
        raise ValueError(f"expected an (H, W) assignment map, got shape {words.shape}")
    if weighting == "centre_prior":
        weights = centre_prior(*words.shape)
    elif weighting == "counts":
        weights = None
    else:
        raise ValueError(f"weighting '{weighting}': expected one of {', '.join(WEIGHTINGS)}")
    words, weights = without_dropped(words, weights, n_words)
    return bow_vector(words.astype(np.int64, copy=False), n_words, weights)


def without_dropped(words: np.ndarray, weights: np.ndarray | None, n_words: int
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """The cells of a map that hold a word, and their weights (``None`` = 1 each):
    cells holding ``n_words`` (dropped by ``keep_cells``) are removed. Unchanged
    (no copy) when the map has none."""
    words = np.asarray(words)
    keep = words != n_words
    if keep.all():
        return words, weights
    w = None if weights is None else np.asarray(weights)[keep]
    return words[keep], w


def weights_of_words(vec: SparseVec, words: np.ndarray) -> np.ndarray:
    """float64 (len(words),): each word's weight in the sparse vector ``vec`` (sorted
    indices), 0 for a word it lacks: the kernel's BoW weights (``asmk_weighting = bow``)
    of an image's aggregated words, which keep words BoW drops."""
    idx, val = vec
    words = np.asarray(words, np.int64)
    if idx.size == 0:
        return np.zeros(words.size)
    at = np.minimum(np.searchsorted(idx, words), idx.size - 1)
    return np.where(idx[at] == words, val[at], 0.0).astype(np.float64)


def word_map_records(batch: Sequence[tuple[str, np.ndarray, tuple[int, int], np.ndarray | None,
                                           Any]],
                     codebook: Codebook, keep_cells: float = 1.0,
                     asmk_bits: int | None = None) -> list[tuple[Any, ...]]:
    """The assignment store's records of a batch of images, with one codebook call.

    ``batch``: (image id, (H*W, D) features, (H, W), cell strength (H, W) or None,
    original (H0, W0)) per image. Returns (image id, word map (H, W) in
    :func:`map_dtype`, original size, ASMK signature or None): step C's assignment,
    streamed distractors and the cluster's shards all write these. ``keep_cells`` < 1
    drops each image's weaker cells (:func:`drop_weak_cells`); ``asmk_bits`` (kernel =
    asmk) aggregates the residuals of the cells that keep their word into the
    signatures."""
    from lib.index.asmk import aggregate

    dt = map_dtype(codebook.k, keep_cells)
    words = codebook.assign(np.concatenate([b[1] for b in batch]))
    out, o = [], 0
    for image_id, feats, hw, strength, orig in batch:
        n = hw[0] * hw[1]
        if len(feats) != n:
            raise UserError(f"image '{image_id}': {len(feats)} local features for a "
                            f"{hw[0]}x{hw[1]} map")
        wm = words[o:o + n].reshape(hw)
        if keep_cells < 1.0:
            if strength is None:
                raise ValueError(f"image '{image_id}': keep_cells needs the cell strength")
            wm = drop_weak_cells(wm, strength, keep_cells, codebook.k)
        sig = None
        if asmk_bits is not None:
            kept = wm.ravel() != codebook.k
            sig = aggregate(feats[kept], wm.ravel()[kept], codebook.centroids, asmk_bits)
        out.append((image_id, wm.astype(dt), orig, sig))
        o += n
    return out
