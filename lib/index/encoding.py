"""From feature maps to words and from words to a database BoW vector.

Why a module of its own: step C (database), step D (queries, re-ranking windows) and the
streaming path of step A must turn maps into words and words into vectors in exactly the
same way; any drift between them silently lowers mAP.
"""

from __future__ import annotations

import numpy as np

from lib.index.bow import SparseVec, bow_vector, centre_prior
from lib.vocabulary.codebook import Codebook
from lib.vocabulary.pca import PCAWhitening

WEIGHTINGS = ("centre_prior", "counts")


def word_dtype(k: int) -> np.dtype:
    """Smallest unsigned type that holds word ids 0..k-1 (uint16 up to 65,536 words)."""
    return np.dtype(np.uint16) if k <= 65536 else np.dtype(np.uint32)


def words_from_maps(maps: np.ndarray, pca: PCAWhitening, codebook: Codebook,
                    l2norm: bool = True) -> np.ndarray:
    """Assignment map (H, W) int64 of already-upsampled maps (C, H, W): row-major local
    features -> L2 -> PCA -> L2 -> nearest word."""
    from lib.features.local_features import maps_to_features

    if maps.ndim != 3:
        raise ValueError(f"expected maps of shape (C, H, W), got {maps.shape}")
    _, h, w = maps.shape
    feats = maps_to_features(maps, l2norm, pca)
    return codebook.assign(feats).reshape(h, w)


def database_vector(words: np.ndarray, weighting: str, n_words: int) -> SparseVec:
    """L2-normalised BoW of one assignment map: per word, the sum of the centre prior of
    its cells (the paper's Oxford/Paris database encoding; the prior is taken on the
    map's own (H, W), so landscape maps get the transposed prior) or plain counts."""
    words = np.asarray(words)
    if words.ndim != 2:
        raise ValueError(f"expected an (H, W) assignment map, got shape {words.shape}")
    if weighting == "centre_prior":
        weights = centre_prior(*words.shape)
    elif weighting == "counts":
        weights = None
    else:
        raise ValueError(f"weighting '{weighting}': expected one of {', '.join(WEIGHTINGS)}")
    return bow_vector(words.astype(np.int64, copy=False), n_words, weights)


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
