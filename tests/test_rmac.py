"""R-MAC region grid (count and placement), pooling and aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from lib.learned.rmac import (
    affine_of,
    extra_regions,
    fit_rmac_pca,
    region_vectors_for_pca,
    rmac,
    rmac_region_vectors,
    rmac_regions,
)


def _overlap_frac(h: int, w: int, d: int) -> float:
    m, big = min(h, w), max(h, w)
    return (m - (big - m) / d) / m


@pytest.mark.parametrize(
    ("h", "w", "d"),
    [(21, 16, 1), (16, 21, 1), (10, 10, 0), (8, 24, 3), (30, 40, 1), (7, 50, 6), (12, 30, 3)],
)
def test_extra_regions_closest_to_40_percent(h, w, d):
    assert extra_regions(h, w) == d
    if d:
        # no other choice in 1..6 is closer to 40 % overlap
        best = abs(_overlap_frac(h, w, d) - 0.4)
        assert all(abs(_overlap_frac(h, w, k) - 0.4) >= best for k in range(1, 7))


@pytest.mark.parametrize(("h", "w", "L"), [(21, 16, 3), (16, 21, 3), (10, 10, 3), (8, 24, 3),
                                          (30, 40, 2), (7, 50, 3), (12, 30, 4)])
def test_region_count_side_and_placement(h, w, L):
    reg = rmac_regions(h, w, L)
    d = extra_regions(h, w)
    m = min(h, w)
    assert len(reg) == sum(lv * (lv + d) for lv in range(1, L + 1))
    pos = 0
    for lv in range(1, L + 1):
        n_long, n_short = lv + d, lv
        block = reg[pos: pos + n_long * n_short]
        pos += len(block)
        side = max(1, 2 * m // (lv + 1))
        assert np.all(block[:, 2] - block[:, 0] == side)
        assert np.all(block[:, 3] - block[:, 1] == side)
        # inside the map; first region at the origin, last one touching the far corner
        assert block[:, :2].min() == 0
        assert block[:, 2].max() == h and block[:, 3].max() == w
        assert np.all(block[:, 2] <= h) and np.all(block[:, 3] <= w)
        rows, cols = np.unique(block[:, 0]), np.unique(block[:, 1])
        nr, nc = (n_long, n_short) if h > w else (n_short, n_long)
        if h == w:
            nr = nc = lv
        assert len(rows) == min(nr, h - side + 1) and len(cols) == min(nc, w - side + 1)
        # evenly spaced (floored): consecutive starts differ by at most 1
        for starts in (rows, cols):
            if len(starts) > 2:
                steps = np.diff(starts)
                assert steps.max() - steps.min() <= 1


def test_level_one_covers_the_short_side_and_square_is_mac():
    reg = rmac_regions(10, 10, 1)
    assert reg.tolist() == [[0, 0, 10, 10]]
    reg = rmac_regions(21, 16, 1)  # portrait: two 16x16 squares, top and bottom
    assert reg.tolist() == [[0, 0, 16, 16], [5, 0, 21, 16]]


def test_explicit_grid_30x40():
    reg = rmac_regions(30, 40, 2)
    # d = 1; level 1: side 30 at columns 0, 10; level 2: side 20, rows {0, 10}, cols {0, 10, 20}
    assert reg[:2].tolist() == [[0, 0, 30, 30], [0, 10, 30, 40]]
    lv2 = reg[2:]
    assert len(lv2) == 6
    assert sorted(set(lv2[:, 0].tolist())) == [0, 10]
    assert sorted(set(lv2[:, 1].tolist())) == [0, 10, 20]


def test_region_vectors_are_region_maxima():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 13, 9)).astype(np.float32)
    reg = rmac_regions(13, 9, 3)
    v = rmac_region_vectors(maps, reg)
    assert v.shape == (len(reg), 5)
    for (r0, c0, r1, c1), row in zip(reg, v):
        np.testing.assert_array_equal(row, maps[:, r0:r1, c0:c1].max(axis=(1, 2)))


def test_rmac_aggregation_matches_definition():
    rng = np.random.default_rng(1)
    maps = rng.random((8, 12, 16)).astype(np.float32)
    vecs = np.concatenate([region_vectors_for_pca(rng.random((8, 12, 16))) for _ in range(10)])
    pca = fit_rmac_pca(vecs, 6)
    out = rmac(maps, 3, pca)
    reg = rmac_region_vectors(maps, rmac_regions(12, 16, 3))
    reg = reg / np.linalg.norm(reg, axis=1, keepdims=True)
    t = pca.transform(reg)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    s = t.sum(0)
    np.testing.assert_allclose(out, s / np.linalg.norm(s), rtol=1e-5, atol=1e-6)
    assert out.shape == (6,) and np.linalg.norm(out) == pytest.approx(1.0, abs=1e-5)


def test_rmac_weights_mask_the_query_box():
    rng = np.random.default_rng(2)
    maps = rng.random((4, 10, 10)).astype(np.float32)
    w = np.zeros((10, 10), np.float32)
    w[:5, :5] = 1
    masked = rmac(maps, 2, weights=w)
    ref = rmac(maps * w[None], 2)
    np.testing.assert_allclose(masked, ref)
    # changing the map outside the box does not change the masked descriptor
    maps2 = maps.copy()
    maps2[:, 6:, 6:] += 5
    np.testing.assert_allclose(rmac(maps2, 2, weights=w), masked)
    assert np.all(rmac(maps, 2, weights=np.zeros((10, 10))) == 0)


def test_fit_rmac_pca_whitens_and_affine_of_recovers_it():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    p = fit_rmac_pca(x, 4)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = p.transform(xn.astype(np.float32))
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(4), atol=1e-3)
    W, b = affine_of(p, 6)
    np.testing.assert_allclose(xn.astype(np.float32) @ W.T + b, y, rtol=1e-4, atol=1e-4)
    # dim is capped at the rank (no whitening of null directions)
    assert fit_rmac_pca(x[:3], 6).dim_out == 2


def test_bad_sizes():
    with pytest.raises(ValueError):
        rmac_regions(0, 5)
    with pytest.raises(ValueError):
        rmac(np.zeros((2, 3, 3)), weights=np.ones((4, 4)))
