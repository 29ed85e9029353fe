"""Word dtype, database vectors (centre prior and counts) and maps -> words."""

from __future__ import annotations

import numpy as np
import pytest

from lib.index.bow import centre_prior, sparse_dot
from lib.index.encoding import database_vector, word_dtype, words_from_maps


def test_word_dtype():
    assert word_dtype(25000) == np.uint16 and word_dtype(65536) == np.uint16
    assert word_dtype(65537) == np.uint32


def test_database_vector_centre_prior_values():
    words = np.zeros((5, 4), np.int64)
    words[2, 2] = 3  # the centre cell (h//2, w//2): prior 1
    words[0, 0] = 1  # the farthest cell: prior 0 -> dropped
    words[4, 3] = 2
    idx, val = database_vector(words, "centre_prior", 10)
    prior = centre_prior(5, 4).astype(np.float64)
    expect = np.zeros(10)
    np.add.at(expect, words.ravel(), prior.ravel())
    expect /= np.linalg.norm(expect)
    assert idx.dtype == np.int32 and val.dtype == np.float32
    assert idx.tolist() == [0, 2, 3]  # word 1 only sits where the prior is 0
    np.testing.assert_allclose(val, expect[idx], rtol=1e-6)
    assert sparse_dot((idx, val), (idx, val)) == pytest.approx(1.0, rel=1e-6)


def test_database_vector_orientation_aware():
    rng = np.random.default_rng(0)
    w = rng.integers(0, 50, (42, 32))
    a = database_vector(w, "centre_prior", 50)
    b = database_vector(w.T, "centre_prior", 50)  # landscape map: transposed prior
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)


def test_database_vector_counts():
    words = np.array([[1, 1], [4, 1]])
    idx, val = database_vector(words, "counts", 5)
    assert idx.tolist() == [1, 4]
    np.testing.assert_allclose(val, np.array([3, 1]) / np.sqrt(10), rtol=1e-6)
    with pytest.raises(ValueError, match="weighting"):
        database_vector(words, "idf", 5)


def test_words_from_maps_is_l2_pca_l2_then_nearest_word():
    from lib.vocabulary.codebook import Codebook
    from lib.vocabulary.pca import PCAWhitening

    rng = np.random.default_rng(1)
    train = np.maximum(rng.standard_normal((400, 10)), 0).astype(np.float32)
    pca = PCAWhitening.fit(train / np.linalg.norm(train, axis=1, keepdims=True), 6)
    cb = Codebook(rng.standard_normal((30, 6)).astype(np.float32))
    maps = np.maximum(rng.standard_normal((10, 5, 4)), 0).astype(np.float32)
    words = words_from_maps(maps, pca, cb)
    assert words.shape == (5, 4) and words.dtype == np.int64
    # by hand: cell (r, c) is row r*W + c of the flattened map
    x = maps.reshape(10, -1).T.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (x - pca.mean) @ pca.components.T / np.sqrt(pca.variances)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    d = ((y[:, None, :] - cb.centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(words.ravel(), d.argmin(1))
