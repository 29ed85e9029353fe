"""``keep_cells``: each image keeps the words of its strongest cells (L2 norm of the raw
feature); the others hold the "no word" id K in the assignment maps, and every consumer
of the maps (database and query vectors, re-ranking windows, expansion) skips them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers_pipeline import call_step, load, make_dataset, run_pipeline
from helpers_rerank import brute_window_score

from lib.errors import SettingsError
from lib.index.bow import centre_prior, to_dense
from lib.index.encoding import (
    cell_strength,
    database_vector,
    map_dtype,
    strongest_cells,
    word_map_records,
)
from lib.search import rerank as rr
from lib.search.query_encoding import query_vector
from lib.search.rerank import rerank, window_scores


def test_strongest_cells_rule():
    s = np.array([[5.0, 1.0, 3.0], [2.0, 4.0, 0.5]])
    # round(0.5 * 6) = 3 cells: the three strongest
    np.testing.assert_array_equal(strongest_cells(s, 0.5), [[1, 0, 1], [0, 1, 0]])
    assert strongest_cells(s, 1.0).all()
    # at least one cell, however small the fraction
    np.testing.assert_array_equal(strongest_cells(s, 0.01), s == 5.0)
    # ties at the threshold are kept together (the same map, the same mask)
    t = np.array([3.0, 1.0, 3.0, 3.0])
    np.testing.assert_array_equal(strongest_cells(t, 0.5), [1, 0, 1, 1])
    maps = np.array([[[3.0, 0.0]], [[4.0, 1.0]]])  # (C=2, H=1, W=2)
    np.testing.assert_allclose(cell_strength(maps), [[5.0, 1.0]])


def test_vectors_skip_the_dropped_cells():
    rng = np.random.default_rng(0)
    K = 7
    words = rng.integers(0, K, (6, 5))
    dropped = rng.random(words.shape) < 0.4
    marked = np.where(dropped, K, words)
    for weighting, base in (("centre_prior", centre_prior(6, 5)), ("counts", np.ones((6, 5)))):
        want = np.bincount(words[~dropped], weights=base[~dropped], minlength=K)
        got = to_dense(database_vector(marked, weighting, K), K)
        np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-6)
    box = np.zeros(words.shape)
    box[1:5, 1:4] = 1.0
    want = np.bincount(words[~dropped & (box > 0)], minlength=K).astype(float)
    got = to_dense(query_vector([marked], [box], K), K)
    np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-6)
    with pytest.raises(ValueError, match="word ids"):
        database_vector(np.full((2, 2), K + 1), "counts", K)


@pytest.mark.parametrize("weighting", ["counts", "centre_prior"])
@pytest.mark.parametrize("levels", [1, 2])
def test_windows_skip_the_dropped_cells(weighting, levels):
    """Every window score with dropped cells on both sides equals the hand-written score
    with those cells weighing 0; the best window's vector has no "no word" entry."""
    rng = np.random.default_rng(1)
    K = 12
    q = rng.integers(0, K, (10, 8))
    m = rng.integers(0, K, (16, 12))
    m[4:10, 3:8] = q[2:8, 1:6]
    qd = np.where(rng.random(q.shape) < 0.3, K, q)
    md = np.where(rng.random(m.shape) < 0.3, K, m)
    cells = (1, 1, 9, 7)
    _, got = window_scores(qd, cells, md, K, levels=levels, weighting=weighting)
    r0, c0, r1, c1 = cells
    qw = np.zeros(q.shape)
    qw[r0:r1, c0:c1] = 1.0 if weighting == "counts" else centre_prior(r1 - r0, c1 - c0)
    mw = np.ones(m.shape) if weighting == "counts" else centre_prior(*m.shape)
    qw, mw = qw * (qd != K), mw * (md != K)
    want = [brute_window_score(np.where(qd == K, 0, qd), cells, np.where(md == K, 0, md),
                               k, K, levels, qw, mw) for k in range(rr.N_WINDOWS)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    res = rerank(qd, cells, [md], K, levels=levels, weighting=weighting)
    idx, val = res.window_vectors[0]
    assert idx.size and idx.max() < K and (val > 0).all()


def test_records_drop_the_weaker_cells():
    """One batch through the shared assignment of step C, streaming and the cluster: the
    weaker cells hold K, the others the codebook's word; the map type holds K."""

    class Nearest:
        k = 65536
        centroids = None

        def assign(self, x):
            return np.asarray(x[:, 0], np.int64)

    feats = np.arange(12, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    strength = np.linspace(1.0, 2.0, 12).reshape(3, 4)
    (rec,) = word_map_records([("a", feats, (3, 4), strength, (30, 40))], Nearest(), 0.5)
    image_id, wm, orig, sig = rec
    assert (image_id, orig, sig) == ("a", (30, 40), None)
    assert wm.dtype == map_dtype(65536, 0.5) == np.uint32
    np.testing.assert_array_equal(wm.ravel(), [65536] * 6 + list(range(6, 12)))
    (rec,) = word_map_records([("a", feats, (3, 4), None, (30, 40))], Nearest())
    assert rec[1].dtype == np.uint16 and rec[1].ravel().tolist() == list(range(12))


def test_settings_checks(tmp_path: Path):
    s = make_dataset(tmp_path)
    with pytest.raises(SettingsError, match="keep_cells"):
        load(s, "keep_cells=0")
    with pytest.raises(SettingsError, match="keep_cells"):
        load(s, "keep_cells=1.5")
    assert load(s, "keep_cells=0.5", "kernel=asmk")["keep_cells"] == 0.5


def test_pipeline_with_keep_cells(tmp_path: Path):
    """A -> E with keep_cells: the maps of C are the full run's maps with the weaker
    cells marked K (their strength recomputed from the feature store), the index holds
    their database vectors, and D re-ranks and expands with them."""
    from lib.features.feature_store import FeatureStore
    from lib.features.local_features import LocalFeatureReader
    from lib.index.assignment_store import AssignmentStore
    from lib.index.inverted_file import InvertedFile

    s = make_dataset(tmp_path)
    run_pipeline(s, "ABC")
    st = load(s)
    with AssignmentStore(AssignmentStore.path_for(st)) as a:
        full = {i: a.get(i)[0] for i in a.ids()}
    with FeatureStore(FeatureStore.path_for(st)) as fs:
        reader = LocalFeatureReader(fs, list(st["new_dim"]) if st["new_dim"] else None,
                                    l2norm=False, pca=None, layers=list(st["layers"]))
        strength = {i: cell_strength(reader.maps(i)) for i in full}
    over = ("keep_cells=0.6", "rerank=true", "query_expansion=lqe")
    call_step("C", s, *over)
    call_step("D", s, *over)
    res = call_step("E", s, *over)
    assert 0.0 < res.counts["map"] <= 1.0
    sk = load(s, *over)
    index = InvertedFile.load(Path(sk["path_output"]) / "index")
    K = int(index.n_words)
    with AssignmentStore(AssignmentStore.path_for(sk)) as a:
        assert a.meta["keep_cells"] == 0.6
        vecs = []
        for i in index.image_ids:
            got = a.get(i)[0]
            keep = strongest_cells(strength[i], 0.6)
            np.testing.assert_array_equal(got, np.where(keep, full[i], K))
            assert 0 < (got == K).sum() < got.size
            vecs.append(database_vector(got, sk["weighting"], K))
    # the index holds those vectors: each one used as a query scores its dot products
    for q in vecs[:5]:
        want = [float(to_dense(q, K) @ to_dense(v, K)) for v in vecs]
        np.testing.assert_allclose(index.scores(q), want, atol=1e-4)  # stored as uint16


def test_kernel_signatures_aggregate_only_the_kept_cells(tmp_path: Path):
    """kernel = asmk with keep_cells: each database image's signatures aggregate the
    residuals of the cells that keep their word (recomputed here from step A's features),
    the query's those of its box cells that keep theirs, and step D scores with them."""
    from lib.features.feature_store import FeatureStore
    from lib.features.local_features import LocalFeatureReader
    from lib.groundtruth.loader import load_ground_truth
    from lib.index import asmk
    from lib.index.inverted_file import InvertedFile
    from lib.provenance import load_models
    from lib.search.query_encoding import QueryEncoder

    s = make_dataset(tmp_path, kernel="asmk", pca_dim=12, n_centers=6, new_dim=[6, 4],
                     keep_cells=0.5)
    run_pipeline(s)
    st = load(s)
    pca, cb = load_models(st)
    images, full = [], []
    with FeatureStore(FeatureStore.path_for(st)) as fs:
        feats = LocalFeatureReader(fs, list(st.new_dim), l2norm=True, pca=pca)
        raw = LocalFeatureReader(fs, list(st.new_dim), l2norm=False, pca=None,
                                 layers=list(st["layers"]))
        index = InvertedFile.load(Path(st["path_output"]) / "index")
        for i in index.image_ids:
            f = np.asarray(feats.features(i), np.float32)
            keep = strongest_cells(cell_strength(raw.maps(i)), 0.5).ravel()
            assert 0 < keep.sum() < keep.size
            images.append(asmk.aggregate(f[keep], cb.assign(f[keep]), cb.centroids))
            full.append(asmk.aggregate(f, cb.assign(f), cb.centroids))
    offsets, docs, sigs, weights = asmk.build_postings(images, 6)
    np.testing.assert_array_equal(index.asmk_offsets, offsets)
    np.testing.assert_array_equal(index.asmk_docs, docs)
    np.testing.assert_array_equal(index.asmk_signatures, sigs)
    np.testing.assert_array_equal(index.asmk_weights, weights)
    assert any(not np.array_equal(a[1], b[1]) or not np.array_equal(a[0], b[0])
               for a, b in zip(images, full))
    scores = np.load(Path(st["path_output"]) / "bow" / "scores.npy")
    enc = QueryEncoder(st)
    try:
        for qi, q in enumerate(load_ground_truth(st).queries):
            eq = enc.encode(q)
            sel = ((eq.weights[0] > 0) & (eq.words[0] != cb.k)).ravel()
            assert 0 < sel.sum() < (eq.weights[0] > 0).sum()
            f, _ = enc._features(q.image)
            fq = f[sel]
            want = asmk.aggregate(fq, asmk.query_words(asmk.centroid_index(cb.centroids),
                                                       fq, int(st["query_ma"])), cb.centroids)
            np.testing.assert_array_equal(eq.asmk[0], want[0])
            np.testing.assert_array_equal(eq.asmk[1], want[1])
            ref = asmk.score_postings(want[0], want[1], offsets, docs, sigs, weights,
                                      len(images), alpha=3.0, tau=0.0, n_bits=12,
                                      per_doc=False)
            np.testing.assert_allclose(scores[qi], ref, rtol=1e-6, atol=1e-7)
    finally:
        enc.close()
