"""Step D's second stage through :class:`lib.search.searcher.BowSearcher` on a fake
index and store: ``rerank_weighting`` reaches the window scorer (counts = the paper,
database = the index's weighting), ``rerank_global`` for queries without a box
(coarse = the 7 large windows, one level; paper = every window), ``qe_select =
verified`` averages only the top results whose best-window score is close to the best
one's (from the re-ranking, or scored for those few images without it), ``qe_select =
top`` is the paper's top ``qe_top``, and the paper's settings files keep the paper's
rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lib.errors import SettingsError
from lib.index.bow import bow_vector, sparse_dot, to_dense
from lib.index.encoding import database_vector
from lib.search.expansion import gqe, lqe
from lib.search.query_encoding import EncodedQuery
from lib.search.rankings import rank_scores
from lib.search.rerank import fuse, rerank
from lib.search.searcher import BowSearcher
from lib.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
K = 40


class FakeIndex:
    """Cosine search over the database vectors; records every query vector."""

    def __init__(self, maps: dict[str, np.ndarray], weighting: str) -> None:
        self.n_words = K
        self.image_ids = list(maps)
        self.vecs = [database_vector(m, weighting, K) for m in maps.values()]
        self.queries: list = []

    def search(self, q):
        self.queries.append(q)
        s = np.array([sparse_dot(q, v) for v in self.vecs], np.float32)
        return rank_scores(s), s


class FakeStore:
    def __init__(self, maps: dict[str, np.ndarray]) -> None:
        self.maps = maps
        self.reads = 0

    def get(self, image_id: str):
        self.reads += 1
        m = self.maps[image_id]
        return m, (m.shape[0] * 10, m.shape[1] * 10)


def _data(seed: int = 0):
    """A query map and 12 database maps: 0-3 hold the query's object (a 8 x 6 patch)
    at different places and sizes of clutter, the rest are clutter."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, K, (16, 12))
    obj = q[4:12, 3:9]
    maps = {}
    for i in range(12):
        m = rng.integers(0, K, (16, 12))
        if i < 4:
            r, c = [(0, 0), (8, 6), (4, 3), (2, 5)][i]
            m[r:r + 8, c:c + 6] = obj
            m[rng.random(m.shape) < 0.1 * i] = rng.integers(0, K)  # decreasing quality
        maps[f"img{i:02d}"] = m
    return q, maps


def _settings(**changes):
    s = {"rerank": False, "top": 12, "ar_threshold": 0.4, "pyramid_levels": 2,
         "query_expansion": "none", "qe_top": 6, "weighting": "centre_prior",
         "kernel": "bow", "rerank_weighting": "database", "rerank_global": "coarse",
         "qe_select": "verified", "qe_verify": 0.8, "rerank_score": "auto",
         "rerank_fusion_weight": 0.15, "qe_alpha": 3.0}
    s.update(changes)
    return s


def _query(q, cells=None) -> EncodedQuery:
    vec = bow_vector(q if cells is None else q[cells[0]:cells[2], cells[1]:cells[3]], K)
    return EncodedQuery("q", "q", (q.shape[0] * 10, q.shape[1] * 10), [], [q], [None],
                        cells, vec)


def _searcher(maps, **changes):
    s = _settings(**changes)
    idx = FakeIndex(maps, s["weighting"])
    return BowSearcher(s, idx, FakeStore(maps)), idx


@pytest.mark.parametrize("rw, weighting, expected", [
    ("counts", "centre_prior", "counts"),
    ("database", "centre_prior", "centre_prior"),
    ("database", "counts", "counts"),
])
def test_rerank_weighting_reaches_the_window_scorer(rw, weighting, expected):
    q, maps = _data()
    srch, idx = _searcher(maps, rerank=True, rerank_weighting=rw, weighting=weighting)
    eq = _query(q, (4, 3, 12, 9))
    r = srch.rank(eq)
    order0, _ = idx.search(eq.vector)
    res = rerank(q, (4, 3, 12, 9), [maps[srch.db_ids[i]] for i in order0[:12]], K,
                 weighting=expected)
    want = order0[:12][np.lexsort((order0[:12], -res.scores))]
    np.testing.assert_array_equal(r.order[:12], want)
    got = {loc["image"]: loc["score"] for loc in r.localisations}
    for i, s in zip(order0[:12].tolist(), res.scores.tolist()):
        assert got[srch.db_ids[i]] == pytest.approx(s, abs=1e-7)


@pytest.mark.parametrize("rule", ["coarse", "paper"])
def test_query_without_a_box(rule):
    """GS: ``coarse`` scores the 7 large windows with one level, ``paper`` every window
    with ``pyramid_levels`` levels (the whole query map as the box)."""
    q, maps = _data(5)
    srch, idx = _searcher(maps, rerank=True, rerank_global=rule)
    eq = _query(q)
    r = srch.rank(eq)
    order0, _ = idx.search(eq.vector)
    top = order0[:12]
    kw = ({"levels": 1, "window_set": "large"} if rule == "coarse"
          else {"levels": 2, "window_set": "all"})
    res = rerank(q, None, [maps[srch.db_ids[i]] for i in top], K, weighting="centre_prior",
                 **kw)
    np.testing.assert_array_equal(r.order[:12], top[np.lexsort((top, -res.scores))])
    boxes = {loc["image"]: loc["box"] for loc in r.localisations}
    for i, (r0, c0, r1, c1) in zip(top.tolist(), res.windows.tolist()):
        assert boxes[srch.db_ids[i]] == [c0 * 10.0, r0 * 10.0, c1 * 10.0, r1 * 10.0]
        if rule == "coarse":
            assert (r1 - r0) * (c1 - c0) * 2 >= 16 * 12  # at least half of the map


def test_paper_selection_expands_with_the_whole_top():
    q, maps = _data(1)
    srch, idx = _searcher(maps, query_expansion="gqe", qe_select="top")
    eq = _query(q)
    srch.rank(eq)
    _, expanded = idx.queries
    order0, _ = idx.search(eq.vector)
    ref = gqe(eq.vector, [idx.vecs[i] for i in order0[:6]])
    np.testing.assert_allclose(to_dense(expanded, K), to_dense(ref, K), atol=1e-7)


def test_verified_gqe_without_rerank_scores_only_the_top():
    """Without re-ranking, only the top qe_top are window-scored (qe_top store reads,
    then the database vectors of the kept ones) and GQE averages the ones within
    qe_verify of the best."""
    q, maps = _data(2)
    srch, idx = _searcher(maps, query_expansion="gqe")
    eq = _query(q, (4, 3, 12, 9))
    srch.rank(eq)
    order0, _ = idx.search(eq.vector)
    tops = order0[:6]
    ws = rerank(q, (4, 3, 12, 9), [maps[srch.db_ids[i]] for i in tops], K,
                weighting="centre_prior").scores
    keep = [i for i, s in zip(tops.tolist(), ws.tolist()) if s >= 0.8 * ws.max()]
    assert 0 < len(keep) < 6
    assert srch.store.reads == 6 + len(keep)  # 6 maps scored, then the kept vectors
    ref = gqe(eq.vector, [idx.vecs[i] for i in keep])
    np.testing.assert_allclose(to_dense(idx.queries[1], K), to_dense(ref, K), atol=1e-7)


def test_verified_lqe_uses_the_rerank_scores():
    q, maps = _data(3)
    srch, idx = _searcher(maps, rerank=True, query_expansion="lqe", qe_verify=0.9)
    eq = _query(q, (4, 3, 12, 9))
    srch.rank(eq)
    order0, _ = idx.search(eq.vector)
    top = order0[:12]
    res = rerank(q, (4, 3, 12, 9), [maps[srch.db_ids[i]] for i in top], K,
                 weighting="centre_prior")
    after = top[np.lexsort((top, -res.scores))][:6]
    pos = {int(i): j for j, i in enumerate(top.tolist())}
    best = res.scores.max()
    keep = [i for i in after.tolist() if res.scores[pos[i]] >= 0.9 * best]
    assert 0 < len(keep) < 6
    ref = lqe(eq.vector, [res.window_vectors[pos[i]] for i in keep])
    np.testing.assert_allclose(to_dense(idx.queries[1], K), to_dense(ref, K), atol=1e-6)
    assert srch.store.reads == 12 + 12  # two re-rankings; no extra scoring for QE


def test_nothing_verified_means_no_expansion():
    """When no top result shares a word with the query box, the query is not expanded:
    the second search uses the query itself."""
    rng = np.random.default_rng(4)
    q = rng.integers(0, 10, (16, 12))
    maps = {f"img{i}": rng.integers(20, K, (16, 12)) for i in range(5)}
    srch, idx = _searcher(maps, query_expansion="gqe")
    eq = _query(q)
    r = srch.rank(eq)
    np.testing.assert_allclose(to_dense(idx.queries[1], K), to_dense(eq.vector, K),
                               atol=1e-7)
    np.testing.assert_array_equal(r.order, np.arange(5))


def test_bad_verification_ratio():
    q, maps = _data()
    srch, _ = _searcher(maps, query_expansion="gqe", qe_verify=1.5)
    with pytest.raises(SettingsError, match="qe_verify"):
        srch.rank(_query(q))


def test_defaults_and_the_paper_settings_files():
    """The new rule is the default; the settings files of the paper's datasets keep the
    paper's rule explicitly (Table 1 stays reproducible)."""
    s = load_settings(REPO / "settings" / "generic.json", check_paths=False)
    assert (s.rerank_weighting, s.rerank_global, s.qe_select, s.qe_verify) == (
        "database", "coarse", "auto", 0.8)
    # generic.json keeps the strongest cells, whose first stage leads the re-ranking
    assert (s.keep_cells, s.rerank_score, s.rerank_fusion_weight, s.qe_alpha) == (
        0.75, "fused", 0.15, 3.0)
    assert s.query_weighting == "centre_prior"
    for name in ("oxford5k", "paris6k", "oxford105k", "paris106k", "roxford5k",
                 "rparis6k", "roxford5k_r1m", "trecvid_subset"):
        s = load_settings(REPO / "settings" / f"{name}.json", check_paths=False)
        assert (s.rerank_weighting, s.rerank_global, s.qe_select, s.query_weighting,
                s.rerank_score) == ("counts", "paper", "top", "counts", "window"), name


@pytest.mark.parametrize("kernel, score, select", [("bow", "window", "verified"),
                                                   ("asmk", "fused", "top")])
def test_auto_rules_follow_the_kernel(kernel, score, select):
    """``auto``: BoW windows order the top and verify the expansion after a BoW search;
    after the selective kernel its own scores lead and its expansion weighs the images."""
    _, maps = _data()
    srch, _ = _searcher(maps, kernel=kernel, qe_select="auto")
    assert (srch.rerank_score, srch.qe_select) == (score, select)
    srch, _ = _searcher(maps, kernel=kernel, rerank_score="window", qe_select="verified")
    assert (srch.rerank_score, srch.qe_select) == ("window", "verified")


def test_fuse_divides_each_side_by_its_largest():
    first = np.array([4.0, 2.0, 1.0, 0.0])
    window = np.array([0.1, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(fuse(first, window, 0.5),
                               [1.0 + 0.1, 0.5 + 0.5, 0.25 + 0.25, 0.0])
    np.testing.assert_allclose(fuse(first, window, 0.0), first / 4)
    # a side with nothing positive gives no evidence (no division by 0 or a negative)
    np.testing.assert_allclose(fuse(np.zeros(3), np.array([0.2, 0.4, 0.0]), 2.0),
                               [1.0, 2.0, 0.0])
    np.testing.assert_allclose(fuse(np.array([-1.0, -2.0]), np.zeros(2), 1.0), [0.0, 0.0])
    assert fuse(np.zeros(0), np.zeros(0), 1.0).size == 0
    with pytest.raises(ValueError, match="weight"):
        fuse(first, window, -1.0)
    with pytest.raises(ValueError, match="scores"):
        fuse(first, window[:3], 1.0)


def test_fused_rerank_orders_the_top_by_both_scores():
    """``rerank_score = fused``: the top is ordered by the first-stage score over the top
    one's plus ``rerank_fusion_weight`` times the window score over the best one's; the
    localisations (and their scores) are still the windows'."""
    q, maps = _data(6)
    cells = (4, 3, 12, 9)
    srch, idx = _searcher(maps, rerank=True, rerank_score="fused", rerank_fusion_weight=0.6)
    eq = _query(q, cells)
    r = srch.rank(eq)
    order0, s0 = idx.search(eq.vector)
    top = order0[:12]
    res = rerank(q, cells, [maps[srch.db_ids[i]] for i in top], K, weighting="centre_prior")
    want = s0[top] / s0[top].max() + 0.6 * res.scores / res.scores.max()
    np.testing.assert_array_equal(r.order[:12], top[np.lexsort((top, -want))])
    win = top[np.lexsort((top, -res.scores))]
    assert not np.array_equal(r.order[:12], win)  # the fusion is not the window order
    assert not np.array_equal(r.order[:12], top)  # nor the first stage's
    got = {loc["image"]: loc["score"] for loc in r.localisations}
    for i, s in zip(top.tolist(), res.scores.tolist()):
        assert got[srch.db_ids[i]] == pytest.approx(s, abs=1e-7)


def test_fused_rerank_after_expansion_fuses_the_expanded_scores():
    """After query expansion the re-ranked top is ordered by the expanded search's
    scores fused with the same windows (the original query's box)."""
    q, maps = _data(7)
    cells = (4, 3, 12, 9)
    srch, idx = _searcher(maps, rerank=True, rerank_score="fused", query_expansion="gqe",
                          qe_select="top")
    eq = _query(q, cells)
    r = srch.rank(eq)
    order2, s2 = idx.search(idx.queries[1])
    top = order2[:12]
    res = rerank(q, cells, [maps[srch.db_ids[i]] for i in top], K, weighting="centre_prior")
    want = fuse(s2[top], res.scores, 0.15)
    np.testing.assert_array_equal(r.order[:12], top[np.lexsort((top, -want))])
