"""Re-ranking with ``weighting = centre_prior`` (settings ``rerank_weighting =
database``): every window score against explicitly weighted histograms, the full-map
window equal to the database vector of the first search, weighted window vectors, and
the paper's counts rule unchanged when nothing is asked for."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_rerank import brute_window_score

from lib.index.bow import bow_vector, centre_prior, sparse_dot
from lib.index.encoding import database_vector
from lib.search import rerank as rr
from lib.search.rerank import lattice, rerank, window_scores


def _weighted_brute_score(q: np.ndarray, cells, m: np.ndarray, k: int, n_words: int,
                          levels: int) -> float:
    """The centre-prior rule: candidate cells carry the centre prior of the candidate
    map, query cells the centre prior of the box (the whole map without one)."""
    r0, c0, r1, c1 = (0, 0, *q.shape) if cells is None else cells
    qweights = np.zeros(q.shape)
    qweights[r0:r1, c0:c1] = centre_prior(r1 - r0, c1 - c0)
    return brute_window_score(q, cells, m, k, n_words, levels, qweights,
                              centre_prior(*m.shape).astype(np.float64))


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("n_words", [6, 300])  # few words: heavy (dense) path; many: pairs
@pytest.mark.parametrize("cells", [(3, 2, 17, 11), None])  # LS box, GS whole map
def test_weighted_window_scores_equal_brute_force(levels, n_words, cells):
    rng = np.random.default_rng(20 + levels + n_words)
    q = rng.integers(0, n_words, (21, 16))
    for shape in [(21, 16), (16, 21), (7, 5)]:
        m = rng.integers(0, n_words, shape)
        wins, sc = window_scores(q, cells, m, n_words, levels, weighting="centre_prior")
        assert wins.shape == (121, 4)
        for k, win in enumerate(wins.tolist()):
            if win[2] <= win[0] or win[3] <= win[1]:
                continue
            assert sc[k] == pytest.approx(
                _weighted_brute_score(q, cells, m, k, n_words, levels), abs=1e-9)


@pytest.mark.parametrize("heavy", [8, 1, 64])
def test_weighted_region_norms_equal_brute_force(heavy, monkeypatch):
    """Weighted entries through both norm paths (block pairs and dense heavy words)."""
    monkeypatch.setattr(rr, "_HEAVY", heavy)
    rng = np.random.default_rng(5)
    maps = np.stack([rng.integers(0, 40, (20, 18)) for _ in range(3)])
    maps[1, :, :9] = 7
    maps[2, 3:9, 2:14] = 5
    en, T = rr._prepare(maps, "centre_prior")
    norms = rr._norms(en, T)
    wts = centre_prior(20, 18).astype(np.float64)
    rb, cb = lattice(20), lattice(18)
    for t in range(3):
        for i, (a, b) in enumerate(rr._INTERVALS.tolist()):
            for j, (c, d) in enumerate(rr._INTERVALS.tolist()):
                h = np.bincount(maps[t, rb[a]:rb[b], cb[c]:cb[d]].ravel(),
                                weights=wts[rb[a]:rb[b], cb[c]:cb[d]].ravel(), minlength=40)
                assert norms[t, i, j] == pytest.approx(float(h @ h), abs=1e-9)


def test_full_map_window_is_the_first_search():
    """With one level and no window passing the filter (full-map fallback), a candidate's
    score is the cosine of the centre-prior-weighted query with the database vector the
    inverted file scored, and its window vector is that database vector."""
    rng = np.random.default_rng(3)
    K = 90
    q = rng.integers(0, K, (21, 16))
    cands = [rng.integers(0, K, (21, 16)), rng.integers(0, K, (16, 21))]
    res = rerank(q, None, cands, K, ar_threshold=1.5, levels=1, weighting="centre_prior")
    qv = bow_vector(q, K, centre_prior(21, 16))
    for m, s, win, v in zip(cands, res.scores, res.windows.tolist(), res.window_vectors):
        dbv = database_vector(m, "centre_prior", K)
        assert win == [0, 0, *m.shape]
        assert s == pytest.approx(sparse_dot(qv, dbv), abs=1e-6)
        np.testing.assert_array_equal(v[0], dbv[0])
        np.testing.assert_allclose(v[1], dbv[1], atol=1e-6)


def test_weighted_window_vectors():
    """LQE's window vectors carry the candidate's centre-prior weights (cells of weight 0,
    the far corners, add no word)."""
    rng = np.random.default_rng(7)
    q = rng.integers(0, 50, (42, 32))
    cands = [rng.integers(0, 50, (42, 32)), rng.integers(0, 50, (32, 42))]
    res = rerank(q, (4, 4, 30, 24), cands, 50, weighting="centre_prior")
    for m, (r0, c0, r1, c1), v in zip(cands, res.windows.tolist(), res.window_vectors):
        w = centre_prior(*m.shape)
        ref = bow_vector(m[r0:r1, c0:c1], 50, w[r0:r1, c0:c1])
        np.testing.assert_array_equal(v[0], ref[0])
        np.testing.assert_allclose(v[1], ref[1], rtol=1e-5)
    # a window holding only the zero-weight corner: the vector is empty, not NaN
    corner = np.zeros((3, 3), np.int64)
    corner[2, 2] = 1
    en, T = rr._prepare(corner[None], "centre_prior")
    assert float(centre_prior(3, 3)[2, 2]) == 0.0
    vec = rr._window_vectors(en, T, np.array([0]))[0]
    assert 1 not in vec[0].tolist() and np.isfinite(vec[1]).all()


def test_counts_is_the_default_and_unchanged():
    rng = np.random.default_rng(9)
    q = rng.integers(0, 40, (21, 16))
    cands = [rng.integers(0, 40, (21, 16)) for _ in range(3)]
    a = rerank(q, (2, 2, 12, 10), cands, 40)
    b = rerank(q, (2, 2, 12, 10), cands, 40, weighting="counts")
    c = rerank(q, (2, 2, 12, 10), cands, 40, weighting="centre_prior")
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.windows, b.windows)
    assert not np.allclose(a.scores, c.scores)


@pytest.mark.parametrize("weighting", ["counts", "centre_prior"])
def test_large_windows(weighting):
    """``window_set = large``: the best of the 7 windows covering at least half of the
    map (full, half height, half width) that pass the aspect-ratio filter."""
    assert int(rr._LARGE.sum()) == 7
    assert rr._cell_windows(42, 32)[rr._LARGE].tolist() == [
        [0, 0, 42, 32], [0, 0, 42, 16], [0, 8, 42, 24], [0, 16, 42, 32],
        [0, 0, 21, 32], [11, 0, 32, 32], [21, 0, 42, 32]]
    rng = np.random.default_rng(12)
    q = rng.integers(0, 30, (21, 16))
    cands = [rng.integers(0, 30, (21, 16)), rng.integers(0, 30, (16, 21))]
    for levels in (1, 2):
        res = rerank(q, None, cands, 30, levels=levels, weighting=weighting,
                     window_set="large")
        for i, m in enumerate(cands):
            wins, sc = window_scores(q, None, m, 30, levels, weighting)
            keep = rr.ar_mask(wins, 16 / 21, 0.4) & rr._LARGE
            assert res.scores[i] == pytest.approx(sc[keep].max(), rel=1e-6)
            assert tuple(res.windows[i]) in {tuple(w) for w in wins[keep]}
    # none of the large windows passes a strict filter: the full map
    res = rerank(q, (0, 0, 21, 4), cands, 30, ar_threshold=0.9, window_set="large")
    assert res.windows.tolist() == [[0, 0, 21, 16], [0, 0, 16, 21]]


def test_bad_weighting():
    q = np.zeros((4, 4), np.int64)
    with pytest.raises(ValueError, match="window_set"):
        rerank(q, None, [q], 3, window_set="small")
    with pytest.raises(ValueError, match="weighting"):
        rerank(q, None, [q], 3, weighting="idf")
    with pytest.raises(ValueError, match="weighting"):
        window_scores(q, None, q, 3, weighting="database")


def test_weighted_batches_give_the_same_result(monkeypatch):
    rng = np.random.default_rng(11)
    q = rng.integers(0, 80, (21, 16))
    cands = [rng.integers(0, 80, (21, 16) if i % 3 else (16, 21)) for i in range(9)]
    monkeypatch.setattr(rr, "CHUNK", 100)
    ref = rerank(q, None, cands, 80, weighting="centre_prior")
    monkeypatch.setattr(rr, "CHUNK", 2)
    got = rerank(q, None, cands, 80, weighting="centre_prior")
    np.testing.assert_array_equal(got.scores, ref.scores)
    np.testing.assert_array_equal(got.windows, ref.windows)
