"""Benchmark: k-means for the vocabulary, exact FAISS Lloyd vs approximate (PQ shortlist) vs
scikit-learn MiniBatchKMeans, on the same sample: wall time and final objective (sum of
squared distances to the exact nearest centroid, recomputed the same way for all three).

Methods run in rotation (exact, approximate, sklearn, exact, ...) so background load on a
shared box hits them alike; medians and ratios to exact are printed.

Data: synthetic L2-PCA-L2 features by default (see ``synthetic_features``), or real ones
from a feature store (``--store``; conv maps read at native size, L2 -> PCA-whitening
fitted on the sample -> L2, as step B does).

    .venv/bin/python benchmarks/bench_kmeans.py                     # synthetic, ~3 min
    .venv/bin/python benchmarks/bench_kmeans.py --store runs/x/features/<name>.lmdb
    .venv/bin/python benchmarks/bench_kmeans.py --niter 40 --tol 1e-4   # stop on convergence

``--tol`` is step B's ``kmeans_tol`` for the two Lloyd loops (0, the default here: every
iteration runs, as before the key existed); the iterations they ran are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from lib.features.local_features import l2n
from lib.vocabulary.codebook import kmeans_objective, train_kmeans
from lib.vocabulary.pca import PCAWhitening


def synthetic_features(n: int, dim: int = 512, n_modes: int = 2000, seed: int = 0,
                       pca: PCAWhitening | None = None) -> tuple[np.ndarray, PCAWhitening]:
    """Clustered, non-negative, low-intrinsic-dimension vectors shaped like ReLU conv
    features (a mixture of ``n_modes`` modes in a 64-D subspace plus correlated and
    isotropic noise, rectified), then L2 -> PCA-whitening -> L2 as in the pipeline.
    ``pca`` reuses a fitted PCA (so queries live in the training space)."""
    rng = np.random.default_rng(seed)
    basis_rng = np.random.default_rng(12345)  # same subspace and modes for every call
    basis = basis_rng.standard_normal((64, dim)).astype(np.float32) / 8
    modes = basis_rng.standard_normal((n_modes, 64)).astype(np.float32) * 1.5
    weights = basis_rng.dirichlet(np.full(n_modes, 0.5))
    lab = rng.choice(n_modes, size=n, p=weights)
    low = modes[lab] + 0.6 * rng.standard_normal((n, 64)).astype(np.float32)
    x = low @ basis + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    x = l2n(np.maximum(x, 0) + 1e-3)
    if pca is None:
        pca = PCAWhitening.fit(x, dim, whiten=True)
    return l2n(pca.transform(x)), pca


def store_features(store_path: Path, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` real native-size local features from a feature store, L2-PCA-L2."""
    from lib.features.feature_store import FeatureStore
    from lib.features.local_features import LocalFeatureReader

    store = FeatureStore(store_path)
    reader = LocalFeatureReader(store, None, l2norm=True)
    rng = np.random.default_rng(seed)
    ids = store.ids()
    rows: list[np.ndarray] = []
    total = 0
    for i in rng.permutation(len(ids)):
        f = np.asarray(reader.features(ids[i]), np.float32)
        rows.append(f)
        total += len(f)
        if total >= n:
            break
    x = np.concatenate(rows)[:n]
    pca = PCAWhitening.fit(x, x.shape[1], whiten=True)
    return l2n(pca.transform(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40000, help="training features")
    ap.add_argument("--k", type=int, default=2048,
                    help="words (>= 1,024, or the approximate mode is exact)")
    ap.add_argument("--niter", type=int, default=10, help="iterations (all methods)")
    ap.add_argument("--repeats", type=int, default=3, help="rotations")
    ap.add_argument("--tol", type=float, default=0.0,
                    help="kmeans_tol of the Lloyd loops (0: all --niter iterations)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", type=Path, default=None, help="real feature store (LMDB)")
    a = ap.parse_args()

    if a.store is not None:
        x, source = store_features(a.store, a.n, a.seed), f"real features from {a.store}"
    else:
        x, _ = synthetic_features(a.n, seed=a.seed)
        source = "synthetic clustered L2-PCA-L2 features"
    print(f"data: {source}: {x.shape[0]} x {x.shape[1]}, k={a.k}, {a.niter} iterations, "
          f"{a.repeats} rotations")

    def sklearn_run() -> np.ndarray:
        from sklearn.cluster import MiniBatchKMeans

        # max_iter counts epochs over the sample: the same passes as Lloyd's niter
        m = MiniBatchKMeans(n_clusters=a.k, init="random", n_init=1, max_iter=a.niter,
                            batch_size=4096, random_state=a.seed, max_no_improvement=None,
                            tol=0.0, reassignment_ratio=0.01)
        return m.fit(x).cluster_centers_.astype(np.float32)

    ran: dict[str, str] = {}  # iterations run and why the loop stopped

    def lloyd(name: str, mode: str) -> np.ndarray:
        r = train_kmeans(x, a.k, a.niter, a.seed, mode, "cpu", tol=a.tol)
        ran[name] = f"{r.niter} ({r.stop})"
        return r.centroids

    methods = {
        "faiss exact": lambda: lloyd("faiss exact", "exact"),
        "approximate (PQ shortlist)": lambda: lloyd("approximate (PQ shortlist)",
                                                    "approximate"),
        "sklearn MiniBatchKMeans": sklearn_run,
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    objective: dict[str, float] = {}
    for _ in range(a.repeats):
        for name, fn in methods.items():
            t = time.perf_counter()
            c = fn()
            times[name].append(time.perf_counter() - t)
            objective[name] = kmeans_objective(x, c)  # same seed -> same result each time
    base_t = statistics.median(times["faiss exact"])
    base_o = objective["faiss exact"]
    print(f"{'method':26s} {'median s':>9s} {'x exact':>8s} {'objective':>12s} "
          f"{'/ exact':>8s}  iterations")
    for name in methods:
        t = statistics.median(times[name])
        print(f"{name:26s} {t:9.2f} {t / base_t:8.2f} {objective[name]:12.2f} "
              f"{objective[name] / base_o:8.4f}  {ran.get(name, '')}")


if __name__ == "__main__":
    main()
