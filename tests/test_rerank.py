"""Spatial re-ranking: window grid, aspect-ratio filter, vectorised scores against a
brute-force computation, localisation of a planted object, and top-T-only re-ordering."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers_rerank import brute_window_score

from lib.index.bow import bow_vector
from lib.search import rerank as rr
from lib.search.rerank import (
    apply_rerank,
    ar_mask,
    lattice,
    rerank,
    window_grid,
    window_scores,
)


def _brute_score(q: np.ndarray, cells, m: np.ndarray, k: int, n_words: int,
                 levels: int) -> float:
    """The paper's counts rule: every cell weighs 1."""
    return brute_window_score(q, cells, m, k, n_words, levels, np.ones(q.shape),
                              np.ones(m.shape))


# ------------------------------------------------------------------------- window grid


def test_lattice_rounds_half_up():
    assert lattice(42).tolist() == [0, 5, 11, 16, 21, 26, 32, 37, 42]
    assert lattice(32).tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 32]


def test_window_grid_42x32():
    win = window_grid(42, 32)
    assert win.shape == (121, 4)
    hgt, wid = win[:, 2] - win[:, 0], win[:, 3] - win[:, 1]
    assert set(hgt.tolist()) == {42, 21, 10, 11}
    assert set(wid.tolist()) == {32, 16, 8}
    assert (win[:, :2] >= 0).all() and (win[:, 2] <= 42).all() and (win[:, 3] <= 32).all()
    assert win[0].tolist() == [0, 0, 42, 32]  # the full map comes first
    # 11 distinct row spans and 11 column spans (1 + 3 + 7), all combined
    assert len({(a, b) for a, _, b, _ in win.tolist()}) == 11
    assert len({(a, b) for _, a, _, b in win.tolist()}) == 11
    # quarter-height windows slide with 50 % overlap in lattice steps and end on the edge
    quarter = sorted({(a, b) for a, _, b, _ in win.tolist() if b - a in (10, 11)})
    assert quarter[0][0] == 0 and quarter[-1][1] == 42
    for (a0, b0), (a1, _) in itertools.pairwise(quarter):
        assert a1 < b0 and a1 - a0 in (5, 6)  # overlap, stride ~ half the size
    # every cell is covered by windows of each size
    for size in (8, 16, 32):
        cover = np.zeros(32, bool)
        for _, c0, _, c1 in win[wid == size].tolist():
            cover[c0:c1] = True
        assert cover.all()


def test_window_grid_small_maps():
    assert window_grid(1, 1).tolist() == [[0, 0, 1, 1]]
    for h, w in [(2, 3), (4, 4), (5, 7), (3, 9)]:
        win = window_grid(h, w)
        assert (win[:, 2] > win[:, 0]).all() and (win[:, 3] > win[:, 1]).all()
        assert len(np.unique(win, axis=0)) == len(win)
        assert win[0].tolist() == [0, 0, h, w]
    with pytest.raises(ValueError):
        window_grid(0, 4)


def test_ar_filter():
    win = window_grid(8, 8)  # sizes 8, 4, 2 on both axes: width/height in {1/4..4}
    ar = (win[:, 3] - win[:, 1]) / (win[:, 2] - win[:, 0])
    keep = ar_mask(win, 1.0, 0.4)
    assert set(ar[keep].tolist()) == {0.5, 1.0, 2.0}
    assert not keep[(ar == 4) | (ar == 0.25)].any()
    # a wide query keeps the wide windows
    keep = ar_mask(win, 3.0, 0.6)
    assert set(ar[keep].tolist()) == {2.0, 4.0}
    # in map cells, portrait and landscape differ: the same full window has AR 32/42
    assert ar_mask(np.array([[0, 0, 42, 32]]), 42 / 32, 0.6).tolist() == [False]


def test_ar_filter_in_rerank_and_fallback():
    rng = np.random.default_rng(3)
    q = rng.integers(0, 20, (16, 16))
    cand = rng.integers(0, 20, (16, 16))
    # a 2-wide, 8-high query box: AR 1/4; only windows with AR within [1/4 / 0.9, ...]
    res = rerank(q, (0, 0, 8, 2), [cand], 20, ar_threshold=0.9)
    r0, c0, r1, c1 = res.windows[0]
    assert (c1 - c0) / (r1 - r0) == pytest.approx(0.25)
    # nothing can pass a threshold above 1: the full map is used
    res = rerank(q, (0, 0, 8, 2), [cand], 20, ar_threshold=1.5)
    assert res.windows[0].tolist() == [0, 0, 16, 16]


# ------------------------------------------------------------------ scores vs brute force


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("n_words", [6, 300])  # few words: heavy (dense) path; many: pairs
def test_window_scores_equal_brute_force(levels, n_words):
    rng = np.random.default_rng(10 + levels + n_words)
    q = rng.integers(0, n_words, (21, 16))
    cells = (3, 2, 17, 11)
    for shape in [(21, 16), (16, 21), (7, 5)]:
        m = rng.integers(0, n_words, shape)
        wins, sc = window_scores(q, cells, m, n_words, levels)
        assert wins.shape == (121, 4) and sc.shape == (121,)
        for k, (win, s) in enumerate(zip(wins.tolist(), sc.tolist())):
            if win[2] <= win[0] or win[3] <= win[1]:
                continue
            assert s == pytest.approx(_brute_score(q, cells, m, k, n_words, levels),
                                      abs=1e-9)


@pytest.mark.parametrize("heavy", [8, 1, 64])
def test_region_norms_equal_brute_force(heavy, monkeypatch):
    """The squared norm of every lattice region (source of every window and quadrant
    norm) equals the explicit histogram's, whichever path (pairs or dense) words take."""
    monkeypatch.setattr(rr, "_HEAVY", heavy)
    rng = np.random.default_rng(5)
    maps = np.stack([rng.integers(0, 40, (20, 18)) for _ in range(3)])
    maps[1, :, :9] = 7  # one word over many blocks
    maps[2, 3:9, 2:14] = 5
    en, T = rr._prepare(maps)
    norms = rr._norms(en, T)
    assert norms.shape == (3, len(rr._INTERVALS), len(rr._INTERVALS))
    rb, cb = lattice(20), lattice(18)
    for t in range(3):
        for i, (a, b) in enumerate(rr._INTERVALS.tolist()):
            for j, (c, d) in enumerate(rr._INTERVALS.tolist()):
                h = np.bincount(maps[t, rb[a]:rb[b], cb[c]:cb[d]].ravel(), minlength=40)
                assert norms[t, i, j] == pytest.approx(float(h @ h), abs=1e-9)


def test_window_vectors_are_window_bows():
    rng = np.random.default_rng(7)
    q = rng.integers(0, 50, (42, 32))
    cands = [rng.integers(0, 50, (42, 32)), rng.integers(0, 50, (32, 42)),
             rng.integers(0, 50, (42, 32))]
    res = rerank(q, None, cands, 50)
    assert res.scores.dtype == np.float32 and res.windows.shape == (3, 4)
    for m, (r0, c0, r1, c1), v in zip(cands, res.windows.tolist(), res.window_vectors):
        ref = bow_vector(m[r0:r1, c0:c1], 50)
        np.testing.assert_array_equal(v[0], ref[0])
        np.testing.assert_allclose(v[1], ref[1], rtol=1e-6)
        assert v[0].dtype == np.int32 and v[1].dtype == np.float32


def test_rerank_best_is_max_over_kept_windows():
    rng = np.random.default_rng(8)
    q = rng.integers(0, 30, (21, 16))
    cands = [rng.integers(0, 30, (21, 16)) for _ in range(4)] + [rng.integers(0, 30, (16, 21))]
    res = rerank(q, (2, 2, 12, 10), cands, 30, ar_threshold=0.4, levels=2)
    for i, m in enumerate(cands):
        wins, sc = window_scores(q, (2, 2, 12, 10), m, 30, 2)
        keep = ar_mask(wins, 8 / 10, 0.4)
        assert res.scores[i] == pytest.approx(sc[keep].max(), rel=1e-6)
        assert tuple(res.windows[i]) in {tuple(w) for w in wins[keep][sc[keep] == sc[keep].max()]}


# ------------------------------------------------------------------- planted object


def test_planted_object_is_localised_and_ranked_first():
    rng = np.random.default_rng(42)
    K = 2000
    q = rng.integers(0, K, (42, 32))
    cells = (5, 4, 15, 12)  # a 10 x 8 box, the shape of a quarter window
    obj = q[5:15, 4:12]
    cands = [rng.integers(0, K, (42, 32)) if i % 2 else rng.integers(0, K, (32, 42))
             for i in range(12)]
    cands[7] = rng.integers(0, K, (42, 32))
    cands[7][16:26, 16:24] = obj  # a quarter-size lattice window (rows 16-21-26)
    cands[4] = rng.integers(0, K, (32, 42))
    cands[4][0:8, 21:29] = obj[:8]  # a partial copy on a landscape map
    res = rerank(q, cells, cands, K)
    assert res.windows[7].tolist() == [16, 16, 26, 24]
    assert int(np.argmax(res.scores)) == 7
    assert res.scores[7] == pytest.approx(1.0, abs=1e-6)  # exact copy, same quadrants
    assert int(np.argsort(-res.scores)[1]) == 4
    # the ranking: candidates came in some order; re-ranking puts 7 first
    order = np.arange(12)[::-1]  # database ids of the candidates, best first
    new = apply_rerank(order, res.scores[order])
    assert new[0] == 7


# ------------------------------------------------------------------- re-ordering


def test_apply_rerank_only_reorders_top():
    rng = np.random.default_rng(1)
    order = rng.permutation(50)
    top = rng.random(10).astype(np.float32)
    top[3] = top[5]  # a tie: broken by database id
    new = apply_rerank(order, top)
    assert new.tolist()[10:] == order.tolist()[10:]
    assert sorted(new[:10].tolist()) == sorted(order[:10].tolist())
    pos = {int(d): i for i, d in enumerate(order[:10])}
    s_new = [top[pos[int(d)]] for d in new[:10]]
    assert all(a >= b for a, b in itertools.pairwise(s_new))
    a, b = order[3], order[5]
    assert new.tolist().index(min(a, b)) < new.tolist().index(max(a, b))
    np.testing.assert_array_equal(apply_rerank(order, np.zeros(0)), order)
    with pytest.raises(ValueError):
        apply_rerank(order[:3], top)


def test_bad_inputs():
    q = np.zeros((4, 4), np.int64)
    with pytest.raises(ValueError):
        rerank(q, (0, 0, 5, 4), [q], 3)  # box outside the map
    with pytest.raises(ValueError, match="word ids"):
        rerank(q, None, [np.full((4, 4), 4)], 3)  # word id out of range
    with pytest.raises(ValueError, match="word ids"):
        rerank(np.full((4, 4), 4), None, [q], 3)  # on the query side too
    # id K is "no word" (a cell dropped by keep_cells): a map of nothing else scores 0
    assert rerank(q, None, [np.full((4, 4), 3)], 3).scores.tolist() == [0.0]
    with pytest.raises(ValueError):
        rerank(q, None, [q], 3, levels=3)
    empty = rerank(q, None, [], 3)  # fewer results than `top`, down to none
    assert empty.scores.shape == (0,) and empty.windows.shape == (0, 4)


def test_batches_give_the_same_result(monkeypatch):
    """Candidates are scored in chunks of CHUNK maps per shape; the result must not
    depend on the chunking or on the order of portrait and landscape candidates."""
    rng = np.random.default_rng(11)
    q = rng.integers(0, 80, (21, 16))
    cands = [rng.integers(0, 80, (21, 16) if i % 3 else (16, 21)) for i in range(9)]
    monkeypatch.setattr(rr, "CHUNK", 100)
    ref = rerank(q, None, cands, 80)
    monkeypatch.setattr(rr, "CHUNK", 2)
    got = rerank(q, None, cands, 80)
    np.testing.assert_array_equal(got.scores, ref.scores)
    np.testing.assert_array_equal(got.windows, ref.windows)
    for a, b in zip(got.window_vectors, ref.window_vectors):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    single = [rerank(q, None, [m], 80) for m in cands]
    np.testing.assert_allclose(ref.scores, [s.scores[0] for s in single], rtol=1e-6)
