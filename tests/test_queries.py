"""Augmentation geometry (the box moves with the image) and query vectors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lib.index.bow import sparse_dot, to_dense
from lib.search.augmentation import (
    VARIANTS,
    Variant,
    crop_geometry,
    transform_box,
    transform_image,
    transform_mask,
    variants_for,
)
from lib.search.geometry import box_mask
from lib.search.masks import mask_bounds, query_weights
from lib.search.query_encoding import query_vector

FLIP, CROP, FLIPCROP = VARIANTS[1], VARIANTS[2], VARIANTS[3]


def test_variants_are_cumulative():
    assert [v.name for v in variants_for(0)] == ["orig"]
    assert [v.name for v in variants_for(1)] == ["orig", "flip"]
    assert [v.name for v in variants_for(3)] == ["orig", "flip", "crop", "flipcrop"]
    with pytest.raises(ValueError):
        variants_for(4)


def test_crop_geometry_integer_offsets():
    assert crop_geometry(6, 10, 1.5) == (9, 15, 1, 2)
    assert crop_geometry(7, 7, 1.5) == (10, 10, 1, 1)  # round(10.5) = 10 (banker's)
    assert crop_geometry(5, 4, 1.0) == (5, 4, 0, 0)


def test_transform_box_by_hand():
    hw = (6, 10)  # 6 rows, 10 columns
    box = (1, 2, 4, 5)
    assert transform_box(box, VARIANTS[0], hw) == (1, 2, 4, 5)
    assert transform_box(box, FLIP, hw) == (6, 2, 9, 5)
    # zoom to 9x15, crop offset (oy, ox) = (1, 2): x*1.5-2, y*1.5-1, clipped to the view
    assert transform_box(box, CROP, hw) == (0, 2, 4, 6)
    # flip first (6, 2, 9, 5), then zoom: x 7..11.5, y 2..6.5 -> clipped to y <= 6
    assert transform_box(box, FLIPCROP, hw) == (7, 2, 10, 6)
    # a box in the corner leaves the crop entirely
    assert transform_box((0, 0, 1, 1), CROP, (60, 100)) is None


def _painted(hw, box):
    """An RGB image that is white exactly inside the (integer) box."""
    a = (box_mask(box, hw)[..., None] * 255).repeat(3, axis=2).astype(np.uint8)
    return Image.fromarray(a)


@pytest.mark.parametrize("v", VARIANTS)
def test_box_moves_with_the_image(v):
    hw, box = (40, 60), (10, 8, 30, 20)
    out = transform_image(_painted(hw, box), v)
    assert out.size == (60, 40)
    seen = mask_bounds(np.asarray(out)[..., 0] > 127)
    want = transform_box(box, v, hw)
    assert seen is not None and want is not None
    np.testing.assert_allclose(seen, want, atol=1.0)  # bilinear edges: within a pixel


@pytest.mark.parametrize("v", VARIANTS)
def test_mask_moves_with_the_image(v):
    hw, box = (40, 60), (10, 8, 30, 20)
    m = transform_mask(box_mask(box, hw), v)
    assert m.shape == hw
    np.testing.assert_allclose(mask_bounds(m), transform_box(box, v, hw), atol=1.0)
    img = np.asarray(transform_image(_painted(hw, box), v))[..., 0] > 127
    assert (img != (m > 0)).mean() < 0.02


def test_flip_is_exact():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = np.asarray(transform_image(Image.fromarray(a), Variant("f", flip=True)))
    np.testing.assert_array_equal(out, a[:, ::-1])
    np.testing.assert_array_equal(transform_mask(a, Variant("f", flip=True)), a[:, ::-1])


def test_query_vector_counts_selected_words():
    words = np.array([[0, 1], [1, 2]])
    sel = np.array([[1, 0], [1, 1]], np.float32)
    idx, val = query_vector([words], [sel], 5)
    assert idx.tolist() == [0, 1, 2]
    np.testing.assert_allclose(val, np.full(3, 1 / np.sqrt(3)), rtol=1e-6)
    idx, val = query_vector([words], [None], 5)  # GS: all words, word 1 twice
    np.testing.assert_allclose(to_dense((idx, val), 5), np.array([1, 2, 1, 0, 0]) / np.sqrt(6),
                               rtol=1e-6)


def test_query_vector_concatenates_views():
    a, b = np.array([[0, 1]]), np.array([[1, 3]])
    v = query_vector([a, b], [None, np.array([[1.0, 0.0]])], 4)
    # a contributes 0, 1; b only its first cell (word 1): counts 0:1, 1:2
    np.testing.assert_allclose(to_dense(v, 4), np.array([1, 2, 0, 0]) / np.sqrt(5), rtol=1e-6)


def test_query_vector_soft_weights_sum_per_word():
    words = np.array([[2, 2], [0, 2]])
    w = np.array([[1.0, 0.5], [0.25, 0.0]], np.float32)
    v = query_vector([words, words], [w, w], 3)
    dense = np.array([0.5, 0.0, 3.0])  # two views: word 0 -> 2*0.25, word 2 -> 2*1.5
    np.testing.assert_allclose(to_dense(v, 3), dense / np.linalg.norm(dense), rtol=1e-6)
    assert sparse_dot(v, v) == pytest.approx(1.0, rel=1e-6)


def test_masked_query_ignores_background_words():
    words = np.arange(16).reshape(4, 4)
    w = query_weights(1, (0, 0, 4, 4), (8, 8), (4, 4))
    idx, _ = query_vector([words], [w], 16)
    assert idx.tolist() == [0, 1, 4, 5]
    with pytest.raises(ValueError):
        query_vector([words], [np.ones((2, 2))], 16)
