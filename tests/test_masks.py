"""Masking modes 0-3: weights checked against maps computed by hand."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from lib.errors import UserError
from lib.search.masks import distance_weights, mask_bounds, query_weights


def test_mode0_and_no_box_mean_all_words():
    assert query_weights(0, (0, 0, 4, 4), (8, 8), (4, 4)) is None
    for mode in (1, 2, 3):
        assert query_weights(mode, None, (8, 8), (4, 4)) is None


def test_mode1_thresholded_box_mask():
    # 8x8 image -> 4x4 map: cell i samples input 2i+0.5, half way between pixels 2i, 2i+1
    w = query_weights(1, (0, 0, 4, 4), (8, 8), (4, 4))
    expected = np.zeros((4, 4), np.float32)
    expected[:2, :2] = 1
    np.testing.assert_array_equal(w, expected)
    # a 3-pixel box: cell 1 sees pixels 2 (in) and 3 (out) -> 0.5, not > 0.5
    w = query_weights(1, (0, 0, 3, 3), (8, 8), (4, 4))
    expected = np.zeros((4, 4), np.float32)
    expected[0, 0] = 1
    np.testing.assert_array_equal(w, expected)
    assert w.dtype == np.float32


def test_mode1_pooling_is_soft():
    w = query_weights(1, (0, 0, 3, 3), (8, 8), (4, 4), pooling=True)
    rows = np.array([1.0, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(w, np.outer(rows, rows), atol=1e-6)


def test_mode1_non_square_map_and_float_box():
    # 6 rows x 12 columns -> 3x4 map; the box is truncated to x 3:9, y 0:4 (as the original)
    w = query_weights(1, (3.7, 0.2, 9.9, 4.5), (6, 12), (3, 4))
    # rows: cell r samples 2r+0.5 -> r=0: pixels 0,1 in; r=1: 2,3 in; r=2: 4,5 out
    # cols: cell c samples 3c+1 -> c=0: pixel 1 (out), c=1: pixel 4 (in), c=2: 7 (in),
    #       c=3: 10 (out)
    expected = np.zeros((3, 4), np.float32)
    expected[:2, 1:3] = 1
    np.testing.assert_array_equal(w, expected)


def test_mode2_box_rounded_outward():
    w = query_weights(2, (0, 0, 3, 3), (8, 8), (4, 4))
    expected = np.zeros((4, 4), np.float32)
    expected[:2, :2] = 1  # floor(0/2)=0, ceil(3/2)=2
    np.testing.assert_array_equal(w, expected)
    w = query_weights(2, (5, 1, 6, 7), (8, 8), (4, 4))
    expected = np.zeros((4, 4), np.float32)
    expected[0:4, 2:3] = 1  # rows floor(0.5)=0..ceil(3.5)=4, cols floor(2.5)=2..ceil(3)=3
    np.testing.assert_array_equal(w, expected)


def test_mode3_distance_transform_by_hand():
    # map size = image size: the bilinear resize is the identity
    w = query_weights(3, (0, 0, 1, 1), (4, 4), (4, 4))
    r, c = np.mgrid[0:4, 0:4]
    expected = 1 - np.hypot(r, c) / np.hypot(3, 3)
    np.testing.assert_allclose(w, expected, atol=1e-6)
    assert w[0, 0] == 1 and w[3, 3] == pytest.approx(0, abs=1e-6)


def test_mode3_inside_box_is_one_and_resized():
    w = query_weights(3, (2, 2, 6, 6), (8, 8), (4, 4))
    assert w.shape == (4, 4)
    np.testing.assert_allclose(w[1:3, 1:3], 1.0)
    # the corners are farthest from the box: the smallest weights, still in [0, 1)
    assert (w >= 0).all() and w[0, 0] < w[0, 1] < 1


def test_mode3_whole_image_box_does_not_divide_by_zero():
    w = query_weights(3, (0, 0, 8, 8), (8, 8), (4, 4))
    np.testing.assert_array_equal(w, np.ones((4, 4), np.float32))
    np.testing.assert_array_equal(distance_weights(np.ones((3, 5))), np.ones((3, 5)))


def test_tiny_box_falls_back_to_cells(caplog):
    with caplog.at_level(logging.WARNING):
        w = query_weights(1, (0, 0, 1, 1), (8, 8), (4, 4), query="q7")
    expected = np.zeros((4, 4), np.float32)
    expected[0, 0] = 1
    np.testing.assert_array_equal(w, expected)
    assert "q7" in caplog.text


def test_sub_pixel_box_still_selects_a_pixel():
    w = query_weights(3, (1.2, 1.2, 1.8, 6.0), (8, 8), (8, 8))
    assert w[1:6, 1].min() == 1.0 and w.max() == 1.0 and w[7, 7] < 1


@pytest.mark.parametrize("box, why", [
    ((4, 4, 4, 6), "zero or negative area"),
    ((5, 1, 2, 3), "zero or negative area"),
    ((20, 20, 30, 30), "outside"),
    ((float("nan"), 0, 3, 3), "non-finite"),
])
def test_bad_boxes_name_the_query(box, why):
    for mode in (0, 1, 2, 3):
        with pytest.raises(UserError, match=f"query 'all_souls_1'.*{why}"):
            query_weights(mode, box, (8, 8), (4, 4), query="all_souls_1")


def test_mask_image_instead_of_box():
    m = np.zeros((8, 8), np.uint8)
    m[1:3, 4:7] = 255
    assert mask_bounds(m) == (4.0, 1.0, 7.0, 3.0)
    w2 = query_weights(2, None, (8, 8), (4, 4), mask=m)
    expected = np.zeros((4, 4), np.float32)
    expected[0:2, 2:4] = 1
    np.testing.assert_array_equal(w2, expected)
    w3 = query_weights(3, None, (8, 8), (8, 8), mask=m)
    np.testing.assert_array_equal(w3[1:3, 4:7], 1)
    with pytest.raises(UserError, match="empty"):
        query_weights(1, None, (8, 8), (4, 4), mask=np.zeros((8, 8)), query="t.1")
    with pytest.raises(UserError, match="does not match"):
        query_weights(1, None, (8, 8), (4, 4), mask=np.ones((4, 8)), query="t.1")
