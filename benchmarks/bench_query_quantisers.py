#!/usr/bin/env python
"""Nearest-word searches for ASMK's query multiple assignment, on real features.

A query photo's end-to-end time under ``kernel = asmk`` is mostly the search for the
``--ma`` nearest words of each of its local features. This compares, on one thread and on
the features of a finished run (feature store + PCA + codebook, read as step C reads
them), exact search (faiss ``IndexFlatL2``, what the asmk package does), the PQ shortlist
that step D uses with ``assignment = approximate`` (``Codebook.nearest``, tuned on
database features as step C tunes it, then at fixed lengths), HNSW and IVF over the
codebook, an IVF fast scan over the words, and the shortlist with half the
sub-quantisers. Queries: the central two thirds (each side) of ``--queries`` images
spread over the store. Reported per method: median CPU ms per query, the share of each
feature's ``--ma`` exact words that it finds, and the Jaccard index of the query's word
sets.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_query_quantisers.py RUN --new-dim 64 48
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import faiss
import numpy as np

from lib.features.feature_store import FeatureStore
from lib.features.local_features import LocalFeatureReader
from lib.index.asmk import centroid_index, query_words
from lib.vocabulary.codebook import PQ_QUERY_BLOCKS, Codebook, _pad, pq_layout
from lib.vocabulary.pca import PCAWhitening


def word_agreement(words: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """One query's (n, k) nearest words against the exact ones: the share of each
    feature's k exact words found (averaged over features), and the Jaccard index of the
    query's word sets."""
    found = np.mean([np.intersect1d(u, v).size for u, v in zip(words, exact)]) / exact.shape[1]
    jaccard = np.intersect1d(words, exact).size / np.union1d(words, exact).size
    return float(found), float(jaccard)


def central(hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    m = np.zeros((h, w), bool)
    m[h // 6:h - h // 6, w // 6:w - w // 6] = True
    return m.ravel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="finished run folder (features/, models/)")
    ap.add_argument("--new-dim", type=int, nargs=2, default=None, help="maps as step C reads")
    ap.add_argument("--ma", type=int, default=5)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    pca = PCAWhitening.load(a.run / "models" / "pca.npz")
    cb = Codebook.load(a.run / "models" / "codebook.npy", mode="approximate")
    stores = sorted((a.run / "features").glob("*.lmdb"))
    store = FeatureStore(stores[0])
    reader = LocalFeatureReader(store, a.new_dim, l2norm=True, pca=pca)
    ids = store.ids()
    rng = np.random.default_rng(a.seed)
    sample = np.concatenate([reader.features_and_shape(ids[i])[0]
                             for i in rng.choice(len(ids), min(40, len(ids)), replace=False)])
    agree = cb.tune(sample[rng.permutation(len(sample))[:20000]])
    tuned = cb.n_candidates
    queries = []
    for i in np.linspace(0, len(ids) - 1, a.queries).round().astype(int):
        x, hw = reader.features_and_shape(ids[i])
        queries.append(np.ascontiguousarray(x[central(hw)]))
    print(f"{stores[0].name}: {cb.k} words, {cb.dim}-D; {a.queries} queries, median "
          f"{np.median([len(x) for x in queries]):.0f} features; PQ shortlist tuned to "
          f"{tuned} candidates ({agree:.4f} agreement on the nearest word)", flush=True)
    exact_index = centroid_index(cb.centroids)
    exact = [query_words(exact_index, x, a.ma) for x in queries]

    methods: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "exact (faiss IndexFlatL2)": lambda x: query_words(exact_index, x, a.ma)}
    for n in sorted({tuned, 8, 16, 32}):
        def pq(x: np.ndarray, n: int = n) -> np.ndarray:
            cb.n_candidates = n
            return cb.nearest(x, a.ma)
        methods[f"PQ shortlist, {n} candidates" + (" (tuned)" if n == tuned else "")] = pq
    nlist = int(4 * np.sqrt(cb.k))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(cb.dim), cb.dim, nlist)
    ivf.cp.seed = 1234
    ivf.train(cb.centroids)
    ivf.add(cb.centroids)
    for probes in (4, 8, 16, 32):
        def ivf_search(x: np.ndarray, probes: int = probes) -> np.ndarray:
            ivf.nprobe = probes
            return ivf.search(x, a.ma)[1]
        methods[f"IVF, {nlist} lists, {probes} probes"] = ivf_search
    d_pad, n_sub = pq_layout(cb.dim)
    padded = _pad(np.ascontiguousarray(cb.centroids, np.float32), d_pad)

    def refined(base: faiss.Index) -> faiss.IndexRefineFlat:
        """``base`` (a fast scan, seeded) trained on the words and blocked like step D's
        shortlist, behind an exact re-ranking of its candidates (the caller keeps
        ``base`` alive: the re-ranking index does not own it)."""
        base.qbs = PQ_QUERY_BLOCKS
        base.train(padded)
        r = faiss.IndexRefineFlat(base)
        r.add(padded)
        return r

    def refined_search(r: faiss.IndexRefineFlat, kf: int, set_base: Callable[[], None]
                       ) -> Callable[[np.ndarray], np.ndarray]:
        def search(x: np.ndarray) -> np.ndarray:
            set_base()
            r.k_factor = kf
            return r.search(_pad(x, d_pad), a.ma)[1]
        return search

    # an IVF fast scan over the words (coarse lists of words, 4-bit PQ codes by residual,
    # exact re-ranking of k_factor x k): scans a few lists instead of every word's code
    ivf_nlist = int(np.sqrt(cb.k))
    ivffs = faiss.IndexIVFPQFastScan(faiss.IndexFlatL2(d_pad), d_pad, ivf_nlist, n_sub, 4)
    ivffs.cp.seed = 1234
    ivffs_refine = refined(ivffs)
    for probes, kf in ((16, 6), (32, 6), (32, 12)):
        methods[f"IVF fast scan, {ivf_nlist} lists, {probes} probes, {kf}k re-ranked"] = \
            refined_search(ivffs_refine, kf, partial(setattr, ivffs, "nprobe", probes))
    # the shortlist's fast scan with half the sub-quantisers (cheaper scan, coarser codes)
    half = faiss.IndexPQFastScan(d_pad, n_sub // 2, 4)
    half.pq.cp.seed = 1234
    half_refine = refined(half)
    for n in (tuned, 2 * tuned, 4 * tuned):
        methods[f"PQ shortlist with {n_sub // 2} sub-quantisers, {n} candidates"] = \
            refined_search(half_refine, n, lambda: None)
    hnsw = faiss.IndexHNSWFlat(cb.dim, 32)
    hnsw.hnsw.efConstruction = 80
    hnsw.add(cb.centroids)
    for ef in (16, 32, 64):
        def hnsw_search(x: np.ndarray, ef: int = ef) -> np.ndarray:
            hnsw.hnsw.efSearch = ef
            return hnsw.search(x, a.ma)[1]
        methods[f"HNSW, M 32, ef {ef}"] = hnsw_search

    # in rotation: every query goes through every method before the next query, so a
    # slow phase of a shared machine hits them alike
    times: dict[str, list[float]] = {m: [] for m in methods}
    out: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for f in methods.values():
        f(queries[0])  # warm-up
    for x in queries:
        for m, f in methods.items():
            t = time.process_time()
            out[m].append(f(x))
            times[m].append(time.process_time() - t)
    print("| method | ms per query | exact words found | Jaccard of word sets |")
    print("|---|---|---|---|")
    for m in methods:
        found, jac = np.mean([word_agreement(o, e) for o, e in zip(out[m], exact)], axis=0)
        print(f"| {m} | {1e3 * np.median(times[m]):.1f} | {found:.4f} | {jac:.4f} |")


if __name__ == "__main__":
    main()
