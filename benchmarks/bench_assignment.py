"""Benchmark: word assignment throughput (local features / s) against a K-word codebook,
exact (FAISS brute force) vs approximate (the PQ fast-scan shortlist re-ranked exactly,
``lib.vocabulary.codebook``), and the agreement of the approximate words with the exact ones. An
HNSW graph over the centroids (FAISS ``IndexHNSWFlat``, M = 32, this project's previous
approximate search) is timed alongside for comparison.

The shortlist length is tuned the way step C tunes it (``Codebook.tune`` on a separate
sample, target 97 % agreement); the tables then show the whole speed/agreement curves.
Exact, approximate and HNSW timings alternate (``--repeats`` rotations); medians and
ratios are printed.

Data: synthetic clustered L2-PCA-L2 features by default (``bench_kmeans.
synthetic_features``; the codebook = K random training features + ``--lloyd`` exact
Lloyd iterations), or real ones from a feature store (``--store``: PCA-whitening and
codebook fitted on half of its images, queries from the other half).

    .venv/bin/python benchmarks/bench_assignment.py
    .venv/bin/python benchmarks/bench_assignment.py --store RUN/features/X.lmdb --kmeans-iters 3

``--query-blocks 0x4444 0x33 0`` then times FAISS's fast-scan query blocking (``qbs``)
settings in rotation with the tuned shortlist, for the whole batch (step C) and for
one query image's worth of features with ASMK's 5 nearest words (step D), and checks
that every setting finds the same words.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.bench_kmeans import synthetic_features
from lib.features.local_features import l2n
from lib.vocabulary.codebook import CANDIDATE_LADDER, Codebook, pq_layout, train_kmeans


def _read(reader: Any, ids: list[str], picks: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` features of the images ``picks`` (in that order)."""
    rows, total = [], 0
    for i in picks:
        rows.append(np.asarray(reader.features(ids[i]), np.float32))
        total += len(rows[-1])
        if total >= n:
            break
    return np.concatenate(rows)[:n]


def real_data(store_path: Path, new_dim: list[int] | None, n_train: int, n_query: int,
              pca_dim: int, seed: int, train_upsampled: bool = False
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training, query, tuning) L2-PCA-L2 features from a feature store: training
    features (native maps, as step B reads them) from one half of the images, query and
    tuning features (maps upsampled to ``new_dim`` when given, as step C reads them)
    from the other half. PCA-whitening fitted on the training features."""
    from lib.features.feature_store import FeatureStore
    from lib.features.local_features import LocalFeatureReader
    from lib.vocabulary.pca import PCAWhitening

    store = FeatureStore(store_path)
    ids = store.ids()
    order = np.random.default_rng(seed).permutation(len(ids))
    half = len(ids) // 2

    train = _read(LocalFeatureReader(store, new_dim if train_upsampled else None,
                                     l2norm=True), ids, order[:half], n_train)
    pca = PCAWhitening.fit(train, min(pca_dim, train.shape[1]), whiten=True)
    test = _read(LocalFeatureReader(store, new_dim, l2norm=True), ids, order[half:],
                 n_query + 5000)
    return l2n(pca.transform(train)), l2n(pca.transform(test[:n_query])), \
        l2n(pca.transform(test[n_query:]))


def time_query_blocks(approx: Codebook, q: np.ndarray, settings: list[int], repeats: int,
                      image_features: int) -> None:
    """Fast-scan query blocking (``qbs``) in rotation: the whole batch through
    ``assign`` and one image's features through ``nearest(., 5)``; the words must not
    depend on the setting."""
    base = getattr(approx._searcher(), "base", None)  # the shortlist's IndexPQFastScan
    if base is None:
        print(f"--query-blocks: {approx.k} words are searched exactly (no fast scan)")
        return
    default = base.qbs
    img = q[:image_features]
    times: dict[int, tuple[list[float], list[float]]] = {s: ([], []) for s in settings}
    ref_batch, ref_img = approx.assign(q), approx.nearest(img, 5)
    try:
        for _ in range(repeats):
            for s in settings:
                base.qbs = s
                t = time.perf_counter()
                w = approx.assign(q)
                times[s][0].append(time.perf_counter() - t)
                t = time.perf_counter()
                w5 = approx.nearest(img, 5)
                times[s][1].append(time.perf_counter() - t)
                if not (np.array_equal(w, ref_batch) and np.array_equal(w5, ref_img)):
                    raise SystemExit(f"qbs {s:#x} changed the words")
    finally:
        base.qbs = default
    print(f"fast-scan query blocking ({approx.n_candidates} candidates, medians of "
          f"{repeats}; the same words with every setting):")
    print(f"{'qbs':>8s} {'batch features/s':>17s} {'image ms (5 words)':>19s}")
    for s in settings:
        print(f"{s:#8x} {len(q) / statistics.median(times[s][0]):17.0f} "
              f"{1e3 * statistics.median(times[s][1]):19.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=25000, help="words (synthetic codebook)")
    ap.add_argument("--n", type=int, default=20000, help="query features timed")
    ap.add_argument("--lloyd", type=int, default=0, help="exact Lloyd iterations to refine "
                    "the synthetic codebook (0 = random training features, k-means init)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", type=Path, default=None, help="real feature store (LMDB)")
    ap.add_argument("--n-train", type=int, default=200000, help="with --store: training "
                    "features for the PCA and the codebook")
    ap.add_argument("--pca-dim", type=int, default=512, help="with --store")
    ap.add_argument("--kmeans-iters", type=int, default=0, help="with --store: approximate "
                    "k-means iterations from the random init (0 = random training features)")
    ap.add_argument("--new-dim", type=int, nargs=2, default=None,
                    help="with --store: upsample query maps to this portrait H W")
    ap.add_argument("--train-upsampled", action="store_true",
                    help="with --new-dim: PCA and codebook trained on upsampled maps too "
                    "(settings train_on = upsampled)")
    ap.add_argument("--query-blocks", nargs="*", default=[], metavar="QBS",
                    help="fast-scan qbs values (hex) to time in rotation, e.g. 0x4444 0x33 0")
    ap.add_argument("--image-features", type=int, default=1400,
                    help="with --query-blocks: features of one query image")
    a = ap.parse_args()
    if a.store is not None:
        train, q, tune = real_data(a.store, a.new_dim, a.n_train, a.n, a.pca_dim, a.seed,
                                   a.train_upsampled)
        rng = np.random.default_rng(a.seed)
        cents = train[np.sort(rng.choice(len(train), a.k, replace=False))]
        if a.kmeans_iters:
            cents = train_kmeans(train, a.k, a.kmeans_iters, a.seed, "approximate").centroids
        source = (f"real L2-PCA-L2 features from {a.store} (PCA to {train.shape[1]}-D on "
                  f"{len(train)} training features), codebook = {a.k} training features + "
                  f"{a.kmeans_iters} approximate k-means iterations; query maps "
                  f"{'upsampled to ' + str(a.new_dim) if a.new_dim else 'native'}, training "
                  f"maps {'upsampled' if a.train_upsampled and a.new_dim else 'native'}")
    else:
        train, pca = synthetic_features(max(a.k * 2, 50000), seed=a.seed)
        rng = np.random.default_rng(a.seed)
        cents = train[np.sort(rng.choice(len(train), a.k, replace=False))]
        if a.lloyd:
            cents = train_kmeans(train, a.k, a.lloyd, a.seed, "exact", "cpu").centroids
        q, _ = synthetic_features(a.n, seed=a.seed + 1, pca=pca)
        tune, _ = synthetic_features(5000, seed=a.seed + 2, pca=pca)
        source = (f"synthetic clustered L2-PCA-L2 features, codebook = {a.k} training "
                  f"features + {a.lloyd} Lloyd iterations")
    k, dim = cents.shape
    print(f"data: {source}; K={k}, D={dim}, {len(q)} query features")

    exact = Codebook(cents, "exact")
    approx = Codebook(cents, "approximate")
    t = time.perf_counter()
    agree_tune = approx.tune(tune, a.target)
    nc = approx.n_candidates
    d_pad, m = pq_layout(dim)
    print(f"shortlist: PQ {m}x4 fast scan over {d_pad}-D; tuned on {len(tune)} features to "
          f"{nc} candidates ({agree_tune:.4f} agreement) in {time.perf_counter() - t:.1f} s "
          "(index build + tuning)")
    hnsw = faiss.IndexHNSWFlat(dim, 32)
    hnsw.hnsw.efConstruction = 40
    hnsw.add(np.ascontiguousarray(cents, np.float32))
    ref = exact.assign(q)
    hnsw_ef = 16
    for ef in (8, 12, 16, 24, 32, 48, 64, 96, 128, 256):
        hnsw.hnsw.efSearch = ef
        hnsw_ef = ef
        if np.mean(hnsw.search(tune, 1)[1][:, 0] == exact.assign(tune)) >= a.target:
            break
    hnsw.hnsw.efSearch = hnsw_ef

    te, ta, th = [], [], []
    for _ in range(a.repeats):
        t = time.perf_counter()
        exact.assign(q)
        te.append(time.perf_counter() - t)
        t = time.perf_counter()
        w = approx.assign(q)
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        wh = hnsw.search(q, 1)[1][:, 0]
        th.append(time.perf_counter() - t)
    agree = float(np.mean(w == ref))
    re, ra, rh = (len(q) / statistics.median(x) for x in (te, ta, th))
    print(f"exact:       {re:10.0f} features/s (median of {a.repeats})")
    print(f"approximate: {ra:10.0f} features/s ({nc} candidates), agreement {agree:.4f}, "
          f"speed-up x{ra / re:.2f}")
    print(f"HNSW:        {rh:10.0f} features/s (efSearch {hnsw_ef}, tuned the same way), "
          f"agreement {np.mean(wh == ref):.4f}, speed-up x{rh / re:.2f}")
    if a.query_blocks:
        time_query_blocks(approx, q, [int(x, 16) for x in a.query_blocks], a.repeats,
                          a.image_features)
    print(f"{'candidates':>10s} {'features/s':>11s} {'x exact':>8s} {'agreement':>10s}")
    for n in CANDIDATE_LADDER[:9]:
        approx.n_candidates = n
        t = time.perf_counter()
        w = approx.assign(q)
        r = len(q) / (time.perf_counter() - t)
        print(f"{n:10d} {r:11.0f} {r / re:8.2f} {np.mean(w == ref):10.4f}")


if __name__ == "__main__":
    main()
