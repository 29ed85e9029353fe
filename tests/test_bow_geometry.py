"""BoW histograms, the centre prior, sparse helpers and pixel<->cell geometry."""

from __future__ import annotations

import numpy as np
import pytest

from lib.index.bow import (
    bow_vector,
    centre_prior,
    from_dense,
    l2_normalise,
    sparse_dot,
    sparse_sum,
    to_dense,
)
from lib.search.geometry import box_is_valid, box_mask, box_to_cells, cells_to_box, resize_bilinear


def test_centre_prior_values():
    p = centre_prior(42, 32)
    assert p.shape == (42, 32) and p.dtype == np.float32
    assert p[21, 16] == 1.0  # centre (h//2, w//2)
    # the farthest cell from (21, 16) is (0, 0): distance sqrt(21^2 + 16^2)
    assert p[0, 0] == pytest.approx(0.0, abs=1e-7)
    d = np.hypot(41 - 21, 31 - 16) / np.hypot(21, 16)
    assert p[41, 31] == pytest.approx(1 - d, rel=1e-6)
    # landscape maps get their own prior (orientation-aware), the transpose
    np.testing.assert_array_equal(centre_prior(32, 42), p.T)


def test_centre_prior_degenerate():
    np.testing.assert_array_equal(centre_prior(1, 1), np.ones((1, 1), np.float32))


def test_bow_vector_counts_and_weights():
    words = np.array([[3, 3, 1], [0, 3, 1]])
    idx, val = bow_vector(words, 5)
    assert idx.tolist() == [0, 1, 3]
    expected = np.array([1, 2, 3], float) / np.sqrt(14)
    np.testing.assert_allclose(val, expected, rtol=1e-6)
    w = np.array([[1, 0, 0.5], [2, 0, 0.5]])
    idx, val = bow_vector(words, 5, weights=w)
    # word 3 sums 1 + 0 + 0 = 1, word 1: 0.5+0.5 = 1, word 0: 2
    np.testing.assert_allclose(to_dense((idx, val), 5), np.array([2, 1, 0, 1, 0]) / np.sqrt(6),
                               rtol=1e-6)
    with pytest.raises(ValueError):
        bow_vector(np.array([5]), 5)


def test_sparse_helpers_match_dense():
    rng = np.random.default_rng(0)
    a = rng.random(50) * (rng.random(50) < 0.3)
    b = rng.random(50) * (rng.random(50) < 0.3)
    sa, sb = from_dense(a), from_dense(b)
    assert sparse_dot(sa, sb) == pytest.approx(float(a @ b), rel=1e-6)
    np.testing.assert_allclose(to_dense(sparse_sum([sa, sb], [0.5, 2.0]), 50),
                               0.5 * a + 2 * b, rtol=1e-6)
    n = l2_normalise(sa)
    assert np.linalg.norm(n[1]) == pytest.approx(1.0, rel=1e-6)


def test_box_to_cells_rounds_outward_and_clips():
    # 336x256 image (portrait) with a 42x32 map: 8 pixels per cell both ways
    assert box_to_cells((8, 16, 24, 40), (336, 256), (42, 32)) == (2, 1, 5, 3)
    assert box_to_cells((9, 17, 23, 39), (336, 256), (42, 32)) == (2, 1, 5, 3)
    assert box_to_cells((-10, -10, 1000, 1000), (336, 256), (42, 32)) == (0, 0, 42, 32)
    # a box thinner than a cell still selects one cell
    assert box_to_cells((8, 8, 8.5, 8.5), (336, 256), (42, 32)) == (1, 1, 2, 2)


def test_cells_to_box_inverse_on_cell_edges():
    assert cells_to_box((2, 1, 5, 3), (336, 256), (42, 32)) == (8.0, 16.0, 24.0, 40.0)


def test_box_mask_truncates_and_excludes_end():
    m = box_mask((1.9, 0.2, 3.7, 2.99), (4, 5))
    expected = np.zeros((4, 5), np.float32)
    expected[0:2, 1:3] = 1
    np.testing.assert_array_equal(m, expected)


def test_resize_bilinear_half_pixel_geometry():
    a = np.zeros((4, 4), np.float32)
    a[:, 2:] = 1
    out = resize_bilinear(a, (2, 2))
    np.testing.assert_allclose(out, [[0, 1], [0, 1]])


@pytest.mark.parametrize(
    "box,why",
    [((5, 5, 5, 9), "zero or negative area"), ((50, 50, 60, 60), "outside"),
     ((1, 1, float("nan"), 3), "non-finite")],
)
def test_box_is_valid(box, why):
    assert why in box_is_valid(box, (40, 30))
    assert box_is_valid((1, 1, 5, 5), (40, 30)) is None
