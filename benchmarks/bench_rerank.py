"""Spatial re-ranking cost per query: the vectorised lib.search.rerank against a per-window loop.

Goal (issue 6): <= 20 ms per query for T = 100 candidates of 42x32 maps, K = 25,000, on
one core (run with OMP_NUM_THREADS=1). Each query is timed for every method in rotation
(the order shifts by one each query) so load from other processes hits all methods alike;
the summary gives medians of wall time and of this process's CPU time, and ratios.

Synthetic maps: the words of a half-resolution map (21x16) are drawn iid from a
Zipf-Mandelbrot law p(r) ~ 1/(r + r0)^s over K words (ranks shuffled onto ids), then
upsampled 2x by repetition, and a fraction ``--fresh`` of the cells draws a new word (what
bilinear upsampling of the features does: in-between features often fall in another
cell). A share ``--landscape`` of the candidates is landscape (32x42). With ``--store``,
the maps come from a real assignment store instead (query = one map, candidates = the
next T maps, box = a random quarter-to-half of the query map).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rerank.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rerank.py \
        --store runs/smvs_dvd/assignments.lmdb
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lib.search.rerank import _WIN, ar_mask, lattice, rerank

RESULTS = Path(__file__).resolve().parent / "results"


class Synthetic:
    """Seeded assignment maps with neighbouring cells sharing words."""

    def __init__(self, k: int, s: float, r0: float, fresh: float, seed: int) -> None:
        p = 1.0 / (np.arange(k) + r0) ** s
        self.cdf = np.cumsum(p / p.sum())
        self.cdf[-1] = 1.0
        self.perm = np.random.default_rng(seed).permutation(k)
        self.fresh = fresh

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return self.perm[np.searchsorted(self.cdf, rng.random(shape))]

    def map(self, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
        half = self.draw(rng, ((h + 1) // 2, (w + 1) // 2))
        m = np.repeat(np.repeat(half, 2, 0), 2, 1)[:h, :w].copy()
        new = rng.random((h, w)) < self.fresh
        m[new] = self.draw(rng, (int(new.sum()),))
        return m


def naive_rerank(q: np.ndarray, cells: tuple[int, int, int, int], cands: list[np.ndarray],
                 k: int, th: float) -> np.ndarray:
    """The direct implementation: a K-long histogram per window and quadrant (levels 2)."""
    r0, c0, r1, c1 = cells
    rm, cm = r0 + (r1 - r0 + 1) // 2, c0 + (c1 - c0 + 1) // 2
    qr = [(r0, c0, r1, c1), (r0, c0, rm, cm), (r0, cm, rm, c1), (rm, c0, r1, cm),
          (rm, cm, r1, c1)]

    def hist(m: np.ndarray, a: int, c: int, b: int, d: int) -> np.ndarray:
        x = np.bincount(m[a:b, c:d].ravel(), minlength=k).astype(np.float64)
        n = np.linalg.norm(x)
        return x / n if n > 0 else x

    qh = [hist(q, *r) for r in qr]
    out = np.zeros(len(cands))
    for t, m in enumerate(cands):
        rb, cb = lattice(m.shape[0]), lattice(m.shape[1])
        spans = zip(_WIN["r"].tolist(), _WIN["c"].tolist())  # lattice spans of the windows
        best = -1.0
        for (ka, kb), (la, lb) in spans:
            a, b, c, d = rb[ka], rb[kb], cb[la], cb[lb]
            if not ar_mask(np.array([[a, c, b, d]]), (c1 - c0) / (r1 - r0), th)[0]:
                continue
            am, cmid = rb[(ka + kb) // 2], cb[(la + lb) // 2]  # halves on the lattice
            parts = [(a, c, b, d), (a, c, am, cmid), (a, cmid, am, d), (am, c, b, cmid),
                     (am, cmid, b, d)]
            s = 0.5 * hist(m, *parts[0]) @ qh[0]
            s += sum(hist(m, *p) @ h for p, h in zip(parts[1:], qh[1:]))
            best = max(best, s / 4.5)
        out[t] = best
    return out


def store_maps(path: Path, n: int) -> tuple[list[np.ndarray], int | None]:
    """The first n maps of an assignment store and its vocabulary size."""
    from lib.index.assignment_store import AssignmentStore

    with AssignmentStore(path) as st:
        ids = st.ids()[:n]
        k = st.meta.get("n_centers")
        return [np.asarray(st.get(i)[0]).astype(np.int64) for i in ids], k


def map_stats(maps: list[np.ndarray]) -> dict[str, float]:
    """Distinct words per map and the share of the most frequent word (what drives the
    cost: repeated words add block pairs)."""
    distinct = [np.unique(m).size for m in maps]
    top = [np.bincount(np.unique(m, return_inverse=True)[1].ravel()).max() / m.size
           for m in maps]
    return {"distinct_words_median": float(np.median(distinct)),
            "top_word_share_median": float(np.median(top))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--top", type=int, default=100, help="candidates per query (T)")
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--k", type=int, default=25000, help="vocabulary size (synthetic)")
    p.add_argument("--h", type=int, default=42)
    p.add_argument("--w", type=int, default=32)
    p.add_argument("--s", type=float, default=0.9, help="Zipf-Mandelbrot exponent")
    p.add_argument("--r0", type=float, default=10.0, help="Zipf-Mandelbrot offset")
    p.add_argument("--fresh", type=float, default=0.5,
                   help="share of upsampled cells that draw a new word")
    p.add_argument("--landscape", type=float, default=0.3)
    p.add_argument("--naive-top", type=int, default=3,
                   help="candidates the per-window loop scores (its time is scaled to T)")
    p.add_argument("--store", type=Path, default=None, help="real assignment store (LMDB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "rerank.json")
    a = p.parse_args()

    rng = np.random.default_rng(a.seed)
    if a.store is not None:
        pool, k_meta = store_maps(a.store, a.queries + a.top)
        k = int(k_meta or max(int(m.max()) for m in pool) + 1)
        source = f"store {a.store}"
    else:
        gen = Synthetic(a.k, a.s, a.r0, a.fresh, a.seed)
        pool = [gen.map(rng, a.h, a.w) if rng.random() >= a.landscape else
                gen.map(rng, a.w, a.h) for _ in range(a.queries + a.top)]
        k = a.k
        source = f"synthetic s={a.s} r0={a.r0} fresh={a.fresh}"

    cases = []
    for i in range(a.queries):
        q = pool[i]
        h, w = q.shape
        bh, bw = rng.integers(h // 4, h // 2 + 1), rng.integers(w // 4, w // 2 + 1)
        r0, c0 = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        cands = [pool[(i + 1 + j) % len(pool)] for j in range(a.top)]
        cases.append((q, (int(r0), int(c0), int(r0 + bh), int(c0 + bw)), cands))

    methods: dict[str, Callable] = {
        "vectorised L=2": lambda q, c, m: rerank(q, c, m, k, 0.4, 2),
        "vectorised L=1": lambda q, c, m: rerank(q, c, m, k, 0.4, 1),
        "per-window loop L=2": lambda q, c, m: naive_rerank(q, c, m[: a.naive_top], k, 0.4),
    }
    scale = {"per-window loop L=2": a.top / a.naive_top}
    wall: dict[str, list[float]] = {n: [] for n in methods}
    cpu: dict[str, list[float]] = {n: [] for n in methods}
    names = list(methods)
    rerank(*cases[0][:2], cases[0][2], k)  # warm-up (imports, first allocations)
    for i, (q, cells, cands) in enumerate(cases):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            t0, c0 = time.perf_counter(), time.process_time()
            methods[name](q, cells, cands)
            wall[name].append((time.perf_counter() - t0) * 1000 * scale.get(name, 1.0))
            cpu[name].append((time.process_time() - c0) * 1000 * scale.get(name, 1.0))
    # agreement of the scores on the naive subset
    q, cells, cands = cases[0]
    fast = rerank(q, cells, cands[: a.naive_top], k).scores
    slow = naive_rerank(q, cells, cands[: a.naive_top], k, 0.4)
    res = {
        "source": source, "T": a.top, "K": k, "queries": a.queries,
        "map_shapes": sorted({m.shape for m in pool}),
        **map_stats(pool[: a.queries + a.top]),
        "max_abs_score_diff_vs_loop": float(np.abs(fast - slow).max()),
        "ms_per_query": {n: {"wall_median": statistics.median(wall[n]),
                             "cpu_median": statistics.median(cpu[n])} for n in names},
    }
    base = res["ms_per_query"]["vectorised L=2"]["cpu_median"]
    print(f"{source}: T={a.top}, K={k}, {a.queries} queries, maps {res['map_shapes']}, "
          f"median {res['distinct_words_median']:.0f} distinct words/map, top word "
          f"{100 * res['top_word_share_median']:.1f} % of cells")
    print("| method | wall ms/query (median) | CPU ms/query (median) | CPU ratio |")
    print("|---|---|---|---|")
    for n in names:
        m = res["ms_per_query"][n]
        extra = f" (scaled from {a.naive_top} candidates)" if n in scale else ""
        print(f"| {n}{extra} | {m['wall_median']:.1f} | {m['cpu_median']:.1f} | "
              f"{m['cpu_median'] / base:.2f} |")
    print(f"max |score difference| vectorised vs loop: {res['max_abs_score_diff_vs_loop']:.2e}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=list))


if __name__ == "__main__":
    main()
