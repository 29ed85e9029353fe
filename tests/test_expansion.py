"""GQE and LQE vectors against a direct dense computation."""

from __future__ import annotations

import numpy as np
import pytest

from lib.index.bow import bow_vector, centre_prior, to_dense
from lib.search.expansion import average_query, gqe, lqe
from lib.search.rerank import rerank

K = 60


def _dense_average(vectors: list[np.ndarray]) -> np.ndarray:
    """The spec's rule on dense vectors: mean of the L2-normalised vectors, then L2."""
    m = np.mean([v / np.linalg.norm(v) for v in vectors], axis=0)
    return m / np.linalg.norm(m)


def _check(result, expected: np.ndarray) -> None:
    idx, val = result
    assert idx.dtype == np.int32 and val.dtype == np.float32
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_allclose(to_dense(result, K), expected, atol=1e-6)
    assert float(np.dot(val, val)) == pytest.approx(1.0, abs=1e-5)


def test_gqe_equals_dense_average():
    rng = np.random.default_rng(0)
    q = bow_vector(rng.integers(0, K, (6, 5)), K)
    tops = [bow_vector(rng.integers(0, K, (8, 6)), K, centre_prior(8, 6)) for _ in range(10)]
    expected = _dense_average([to_dense(q, K)] + [to_dense(t, K) for t in tops])
    _check(gqe(q, tops), expected)


def test_average_ignores_input_scale():
    rng = np.random.default_rng(1)
    q = bow_vector(rng.integers(0, K, (5, 5)), K)
    t = bow_vector(rng.integers(0, K, (5, 5)), K)
    scaled = (t[0], t[1] * 7.0)  # an unnormalised vector counts as much as its L2 version
    np.testing.assert_allclose(to_dense(average_query(q, [scaled]), K),
                               to_dense(average_query(q, [t]), K), atol=1e-7)
    # no other vectors: the query itself
    np.testing.assert_allclose(to_dense(average_query(q, []), K), to_dense(q, K), atol=1e-7)


def test_lqe_uses_the_best_windows():
    rng = np.random.default_rng(2)
    qmap = rng.integers(0, K, (21, 16))
    cells = (4, 3, 14, 11)
    q = bow_vector(qmap[4:14, 3:11], K)
    cands = [rng.integers(0, K, (21, 16)) for _ in range(4)] + [rng.integers(0, K, (16, 21))]
    res = rerank(qmap, cells, cands, K)
    direct = [bow_vector(m[r0:r1, c0:c1], K)
              for m, (r0, c0, r1, c1) in zip(cands, res.windows.tolist())]
    expected = _dense_average([to_dense(q, K)] + [to_dense(v, K) for v in direct])
    _check(lqe(q, res.window_vectors), expected)
    # LQE differs from GQE with the full images (the windows leave the background out)
    full = [bow_vector(m, K) for m in cands]
    assert not np.allclose(to_dense(gqe(q, full), K), expected, atol=1e-3)


# ------------------------------------------------------------- verified neighbours


def test_verified_keeps_results_close_to_the_best():
    from lib.search.expansion import verified

    s = [0.5, 0.45, 0.3, 0.41, 0.4]
    assert verified(s, 0.8).tolist() == [True, True, False, True, True]
    assert verified(s, 1.0).tolist() == [True, False, False, False, False]
    # the best need not come first (the first-stage order is not the window order)
    assert verified([0.2, 0.6, 0.5], 0.8).tolist() == [False, True, True]
    # ratio 0: every result with a positive score; non-positive scores never pass
    assert verified([0.3, 0.0, 0.1], 0.0).tolist() == [True, False, True]


def test_verified_with_nothing_to_verify():
    from lib.search.expansion import verified

    assert verified([], 0.8).tolist() == []
    assert verified([0.0, 0.0], 0.8).tolist() == [False, False]  # nothing shares a word
    with pytest.raises(ValueError):
        verified([0.3], 1.5)
    with pytest.raises(ValueError):
        verified([0.3], -0.1)
