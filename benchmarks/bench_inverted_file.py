"""Inverted file at Oxford105k size from synthetic assignment maps of the real shape.

Measures bytes per posting, build time and peak RSS (build in a subprocess, read with
resource.getrusage), load time, and query time on one core for a box query (~600
distinct words) and a full-image query (~1,000), with the number of postings each query
touches (the cost driver) so that other word distributions can be extrapolated.

Synthetic maps: every image is a 42x32 map (1,344 cells) of iid words drawn from a
Zipf-Mandelbrot law p(r) ~ 1/(r + r0)^s over K = 25,000 words (defaults s = 0.9,
r0 = 10: ~1,030 distinct words per image), ranks shuffled onto word ids with the seed;
weights = the centre prior summed per word, L2-normalised (the paper's Oxford setting).
iid draws are a pessimistic model: real maps repeat words between neighbouring cells
and random image pairs share fewer words, so real queries touch fewer postings.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_inverted_file.py --n-images 105000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from lib.allocator import retain_freed_memory
from lib.artefacts import atomic_path
from lib.index.bow import centre_prior
from lib.index.inverted_file import InvertedFile

RESULTS = Path(__file__).resolve().parent / "results"
MAP_H, MAP_W, K = 42, 32, 25000


# --------------------------------------------------------------------------- synthetic data

class SyntheticMaps:
    """Seeded generator of assignment maps and their BoW vectors, chunk by chunk."""

    def __init__(self, k: int = K, s: float = 0.9, r0: float = 10.0, seed: int = 0,
                 upsample: int = 1) -> None:
        self.k, self.seed, self.up = k, seed, upsample
        p = 1.0 / (np.arange(k) + r0) ** s
        self.cdf = np.cumsum(p / p.sum())
        self.cdf[-1] = 1.0
        self.perm = np.random.default_rng(seed).permutation(k).astype(np.int32)
        self.prior = centre_prior(MAP_H, MAP_W).ravel().astype(np.float64)

    def maps(self, rng: np.random.Generator, n: int, h: int = MAP_H, w: int = MAP_W
             ) -> np.ndarray:
        """n maps of h x w words, flattened; with ``upsample`` f the words are drawn on
        an (h/f) x (w/f) grid and repeated f x f (a map upsampled from 21x16 by nearest
        neighbour: at most 336 distinct words, the other extreme from iid cells)."""
        f = self.up
        u = rng.random((n, -(-h // f), -(-w // f)))
        m = self.perm[np.searchsorted(self.cdf, u)]
        m = np.repeat(np.repeat(m, f, axis=1), f, axis=2)[:, :h, :w]
        return np.ascontiguousarray(m).reshape(n, h * w)

    def vectors_of(self, words: np.ndarray, weights: np.ndarray
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rows of word maps -> L2-normalised sparse vectors (vectorised per chunk)."""
        n, m = words.shape
        order = np.argsort(words, axis=1, kind="stable")
        sw = np.take_along_axis(words, order, 1).ravel()
        sv = np.broadcast_to(weights, (n, m))[np.arange(n)[:, None], order].ravel()
        start = np.ones(sw.size, bool)
        start[1:] = sw[1:] != sw[:-1]
        start[::m] = True  # a new row always starts a new word
        heads = np.flatnonzero(start)
        idx = sw[heads].astype(np.int32)
        val = np.add.reduceat(sv, heads)
        row_heads = np.searchsorted(heads, np.arange(0, n * m, m))
        sq = np.add.reduceat(val * val, row_heads)
        val = (val / np.sqrt(np.repeat(sq, np.diff(np.append(row_heads, heads.size)))))
        val = val.astype(np.float32)
        return list(zip(np.split(idx, row_heads[1:]), np.split(val, row_heads[1:])))

    def db_maps(self, n: int) -> np.ndarray:
        """The first n (<= 4,096) database maps exactly as :meth:`stream` makes them."""
        return self.maps(np.random.default_rng([self.seed, 0]), n)

    def stream(self, n_images: int, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The database's vectors, generated chunk by chunk (bounded memory)."""
        for c0 in range(0, n_images, chunk):
            rng = np.random.default_rng([self.seed, c0])
            yield from self.vectors_of(self.maps(rng, min(chunk, n_images - c0)), self.prior)

    def queries(self, n: int, box: tuple[int, int] | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Full-image queries (box None, counts as in the paper's query side) or box
        queries: the words of an h x w sub-map."""
        rng = np.random.default_rng([self.seed, 1 << 40])
        h, w = box or (MAP_H, MAP_W)
        return self.vectors_of(self.maps(rng, n, h, w), np.ones(h * w))


class RealMaps(SyntheticMaps):
    """Real assignment maps (a step-C store of 42x32 maps, e.g. SMVS through Lite0 at
    336x256 upsampled to 42x32 with 25,000 words) made into any number of distinct
    images: image i is real map i mod n_real with its words relabelled by a bijection
    that only moves a word within its document-frequency stratum (the words sorted by df
    and cut into ``strata`` groups of equal size; a seeded cyclic shift per image and
    stratum). Each synthetic image keeps its source's spatial structure (repeated words
    between neighbouring cells, distinct words per image) and the database keeps the real
    df distribution, which decides how many postings a query touches; pairs of images
    share words only as often as the df law says (co-occurrence structure is lost).
    Landscape maps are transposed to portrait so that boxes are spatial."""

    def __init__(self, store: Path, seed: int = 0, strata: int = 50) -> None:
        from lib.index.assignment_store import AssignmentStore

        with AssignmentStore(store) as st:
            k = int(st.meta["n_centers"])
            maps = []
            for i in st.ids():
                w = st.get(i)[0]
                maps.append(w.T if w.shape[0] < w.shape[1] else w)
        shapes = {m.shape for m in maps}
        if shapes != {(MAP_H, MAP_W)}:
            raise SystemExit(f"{store}: expected {MAP_H}x{MAP_W} maps, found {sorted(shapes)}")
        self.k, self.seed, self.up = k, seed, 1
        self.real = np.stack([m.ravel() for m in maps]).astype(np.int64)
        self.prior = centre_prior(MAP_H, MAP_W).ravel().astype(np.float64)
        df = np.zeros(k, np.int64)
        for row in self.real:
            df[np.unique(row)] += 1
        self.df = df
        size = -(-k // strata)
        order = np.argsort(df, kind="stable")  # rarest first, ties by word id
        padded = np.full(strata * size, -1, np.int64)
        padded[:k] = order
        self.members = padded.reshape(strata, size)  # the last stratum may hold -1 pads
        self.counts = (self.members >= 0).sum(1)
        pos = np.empty(k, np.int64)
        pos[order] = np.arange(k)
        self.stratum, self.rank = pos // size, pos % size

    def maps(self, rng: np.random.Generator, n: int, h: int = MAP_H, w: int = MAP_W,
             first: int | None = None) -> np.ndarray:
        """n relabelled real maps (sources ``first``, first+1, ... mod n_real, or random
        sources when ``first`` is None), cropped to their central h x w cells."""
        n_real = len(self.real)
        src = (np.arange(n) + first) % n_real if first is not None else \
            rng.integers(0, n_real, n)
        words = self.real[src]
        shift = rng.integers(0, 1 << 30, (n, len(self.members)))
        g, r = self.stratum[words], self.rank[words]
        sh = np.take_along_axis(shift, g, 1)
        m = self.members[g, (r + sh) % self.counts[g]]
        if (h, w) != (MAP_H, MAP_W):
            y0, x0 = (MAP_H - h) // 2, (MAP_W - w) // 2
            m = m.reshape(n, MAP_H, MAP_W)[:, y0:y0 + h, x0:x0 + w].reshape(n, h * w)
        return np.ascontiguousarray(m)

    def db_maps(self, n: int) -> np.ndarray:
        return self.maps(np.random.default_rng([self.seed, 0]), n, first=0)

    def stream(self, n_images: int, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for c0 in range(0, n_images, chunk):
            rng = np.random.default_rng([self.seed, c0])
            yield from self.vectors_of(self.maps(rng, min(chunk, n_images - c0), first=c0),
                                       self.prior)


def make_generator(real_maps: Path | None, s: float, r0: float, seed: int,
                   upsample: int = 1) -> SyntheticMaps:
    return RealMaps(real_maps, seed) if real_maps is not None else \
        SyntheticMaps(s=s, r0=r0, seed=seed, upsample=upsample)


# --------------------------------------------------------------------------- plotting

def line_plot(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]],
              title: str, xlabel: str, ylabel: str, log_x: bool = True,
              log_y: bool = True, size: tuple[int, int] = (640, 420)) -> None:
    """A minimal line plot with Pillow (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    dr = ImageDraw.Draw(img)
    left, right, top, bottom = 80, size[0] - 40, 40, size[1] - 60
    xs = [x for v in series.values() for x in v[0]]
    ys = [y for v in series.values() for y in v[1] if y > 0 or not log_y]
    tx = np.log10 if log_x else (lambda a: np.asarray(a, float))
    ty = np.log10 if log_y else (lambda a: np.asarray(a, float))
    x0, x1 = float(tx(min(xs))), float(tx(max(xs)))
    y0, y1 = float(ty(min(ys))), float(ty(max(ys)))
    if log_y:
        y0, y1 = np.floor(y0), np.ceil(y1)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (float(tx(x)) - x0) / (x1 - x0) * (right - left),
                bottom - (float(ty(y)) - y0) / (y1 - y0) * (bottom - top))

    dr.rectangle([left, top, right, bottom], outline="black")
    for t in np.linspace(y0, y1, 5):
        yv = 10 ** t if log_y else t
        _, yy = px(min(xs), yv)
        dr.line([left - 4, yy, left, yy], fill="black")
        dr.text((4, yy - 6), f"{yv:.3g}", fill="black")
    last = -1e9
    for xv in sorted(set(xs)):
        xx, _ = px(xv, 10 ** y0 if log_y else y0)
        dr.line([xx, bottom, xx, bottom + 4], fill="black")
        if xx - last >= 56:  # label only ticks that do not overlap
            dr.text((xx - 20, bottom + 8), f"{xv:.3g}", fill="black")
            last = xx
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for i, (name, (sx, sy)) in enumerate(series.items()):
        c = colours[i % len(colours)]
        pts = [px(x, y) for x, y in zip(sx, sy) if y > 0 or not log_y]
        if len(pts) > 1:
            dr.line(pts, fill=c, width=2)
        for x, y in pts:
            dr.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        dr.text((left + 10, top + 8 + 14 * i), name, fill=c)
    dr.text((left, 12), title, fill="black")
    dr.text(((left + right) // 2 - 40, size[1] - 30), xlabel, fill="black")
    dr.text((4, top - 28), ylabel, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# --------------------------------------------------------------------------- measurements

def time_blocks(calls: dict[str, Callable[[int], object]], n_queries: int,
                 reps: int) -> dict[str, float]:
    """Median CPU ms per query of each call (``calls[name](i)`` runs query i). Each call
    runs all queries back to back, as its own query loop would (warm caches); the calls
    alternate in blocks, forward then backward, ``reps`` times, so a slow phase of a
    shared box hits all. A first untimed pass over the queries warms every call."""
    for f in calls.values():
        for i in range(n_queries):
            f(i)
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            f = calls[n]
            for i in range(n_queries):
                a = time.process_time()
                f(i)
                times[n].append(time.process_time() - a)
    return {n: 1000 * float(np.median(v)) for n, v in times.items()}


def build_worker(out: Path, n_images: int, s: float, r0: float, seed: int,
                 upsample: int = 1, real_maps: Path | None = None) -> None:
    """Runs in a child process: generate + build; prints a JSON line with the timings."""
    gen = make_generator(real_maps, s, r0, seed, upsample)
    ids = [f"synthetic/{i:07d}" for i in range(n_images)]
    t = time.perf_counter()
    ivf = InvertedFile.build(out, gen.stream(n_images), gen.k, ids, {
        "synthetic": True, "zipf_s": s, "zipf_r0": r0, "seed": seed, "upsample": upsample,
        "real_maps": str(real_maps) if real_maps else None})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    print(json.dumps({"build_s": time.perf_counter() - t, "n_postings": ivf.n_postings,
                      "peak_rss_gib": peak}))


def measure_build(out: Path, n_images: int, s: float, r0: float, seed: int,
                  upsample: int = 1, real_maps: Path | None = None) -> dict:
    """Build in a fresh child process, which reports its own peak RSS (getrusage)."""
    cmd = [sys.executable, __file__, "--_worker", str(out), "--n-images", str(n_images),
           "--zipf-s", str(s), "--zipf-r0", str(r0), "--seed", str(seed),
           "--upsample", str(upsample)]
    if real_maps is not None:
        cmd += ["--real-maps", str(real_maps)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"build failed:\n{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(wall_s=wall)
    return res


def measure_queries(path: Path, gen: SyntheticMaps, n_queries: int) -> dict:
    t = time.perf_counter()
    ivf = InvertedFile.load(path)
    load_s = time.perf_counter() - t
    out: dict = {"load_ms": 1000 * load_s}
    for name, box in (("box", (30, 24)), ("full", None)):
        qs = gen.queries(n_queries, box)
        ivf.scores(qs[0])  # warm the page cache for a fair steady state
        ts, tc, tf, tt, touched = [], [], [], [], []
        for q in qs:
            a, ca = time.perf_counter(), time.process_time()
            ivf.scores(q)
            b, cb = time.perf_counter(), time.process_time()
            ivf.search(q)
            c = time.perf_counter()
            ivf.search_top(q, 100)
            d = time.perf_counter()
            ts.append(b - a)
            tc.append(cb - ca)
            tf.append(c - b)
            tt.append(d - c)
            touched.append(ivf.postings_touched(q))
        med, cpu = float(np.median(ts)), float(np.median(tc))
        out[name] = {"distinct_words": float(np.mean([q[0].size for q in qs])),
                     "postings_touched": float(np.median(touched)),
                     "scores_ms": 1000 * med, "scores_cpu_ms": 1000 * cpu,
                     "search_ms": 1000 * float(np.median(tf)),
                     "search_top100_ms": 1000 * float(np.median(tt)),
                     "ns_per_posting": 1e9 * med / max(np.median(touched), 1),
                     "cpu_ns_per_posting": 1e9 * cpu / max(np.median(touched), 1)}
    return out


def quantisation_error(gen: SyntheticMaps, n_images: int, n_queries: int) -> dict:
    """Scores of the uint16 index against exact float64 scores (scipy CSR product) on a
    small synthetic index, for queries that are 30x24 boxes of database images: largest
    and mean absolute error against the analytic bound, whether the source image still
    ranks first, and how much of the top-100 agrees (random synthetic images score
    within ~1e-5 of each other, so near-ties below the source image do reorder)."""
    from scipy import sparse

    vecs = list(gen.stream(n_images))
    rows = np.repeat(np.arange(n_images), [v[0].size for v in vecs])
    x = sparse.csr_matrix((np.concatenate([v[1] for v in vecs]).astype(np.float64),
                           (rows, np.concatenate([v[0] for v in vecs]))), (n_images, gen.k))
    maps = gen.db_maps(min(n_images, 4096))
    maps = maps.reshape(-1, MAP_H, MAP_W)[:n_queries, 6:36, 4:28].reshape(n_queries, -1)
    with tempfile.TemporaryDirectory() as d:
        ivf = InvertedFile.build(Path(d) / "i", vecs, gen.k, [str(i) for i in range(n_images)], {})
        errs, bound, first, same, overlap = [], 0.0, 0, 0, []
        for i, q in enumerate(gen.vectors_of(maps, np.ones(maps.shape[1]))):
            ref = x @ np.bincount(q[0], q[1].astype(np.float64), minlength=gen.k)
            order, got = ivf.search(q)
            errs.append(np.abs(got - ref))
            bound = max(bound, 0.5 / 65535 * float(np.abs(q[1]).sum()))
            r100 = np.argsort(-ref, kind="stable")[:100]
            first += int(order[0] == i)
            same += int(np.array_equal(order[:100], r100))
            overlap.append(np.intersect1d(order[:100], r100).size / 100)
    e = np.concatenate(errs)
    return {"max_abs_err": float(e.max()), "mean_abs_err": float(e.mean()),
            "err_bound": bound, "source_first": f"{first}/{n_queries}",
            "top100_identical": f"{same}/{n_queries}", "top100_overlap": float(np.mean(overlap))}


def index_bytes(path: Path) -> dict:
    sizes = {p.name: p.stat().st_size for p in path.iterdir()}
    return {"total_bytes": sum(sizes.values()), "postings_bytes":
            sizes["docs.npy"] + sizes["weights.npy"] - 256}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=105_000)
    ap.add_argument("--queries", type=int, default=20, help="queries per kind")
    ap.add_argument("--zipf-s", type=float, default=0.9)
    ap.add_argument("--zipf-r0", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--upsample", type=int, default=1,
                    help="draw words on a grid f times coarser and repeat them f x f "
                    "(2: like nearest-neighbour upsampling from 21x16)")
    ap.add_argument("--real-maps", type=Path, default=None,
                    help="a step-C assignment store of 42x32 maps: build from relabelled "
                    "real maps (RealMaps) instead of the Zipf model")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the index is built (default: a temporary folder, removed)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --workdir: query an index already built there (no build numbers)")
    ap.add_argument("--csv", type=Path, default=None,
                    help="results file; a row is appended (default: results/inverted_file.csv"
                    ", or inverted_file_real.csv with --real-maps)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's freed-memory handling as it is (to measure what "
                    "lib.allocator.retain_freed_memory saves)")
    ap.add_argument("--_worker", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker is not None:
        build_worker(a._worker, a.n_images, a.zipf_s, a.zipf_r0, a.seed, a.upsample,
                     a.real_maps)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not a.default_malloc:
        retain_freed_memory()  # as the pipeline scripts do (lib/allocator.py)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="blcf-bench-ivf-"))
    try:
        out = work / "index"
        if a.reuse and (out / "meta.json").exists():
            hdr = InvertedFile.load(out).header
            if hdr["n_docs"] != a.n_images or hdr["meta"].get("upsample", 1) != a.upsample \
                    or hdr["meta"].get("real_maps") != (str(a.real_maps) if a.real_maps else None):
                raise SystemExit(f"{out}: built with other parameters")
            b = {"build_s": float("nan"), "peak_rss_gib": float("nan"),
                 "n_postings": hdr["n_postings"]}
        else:
            b = measure_build(out, a.n_images, a.zipf_s, a.zipf_r0, a.seed, a.upsample,
                              a.real_maps)
        ib = index_bytes(out)
        gen = make_generator(a.real_maps, a.zipf_s, a.zipf_r0, a.seed, a.upsample)
        q = measure_queries(out, gen, a.queries)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    qe = quantisation_error(gen, min(a.n_images, 5000), a.queries)
    bpp = ib["postings_bytes"] / b["n_postings"]
    model = (f"relabelled real maps of {a.real_maps}" if a.real_maps else
             f"Zipf s={a.zipf_s} r0={a.zipf_r0} upsample={a.upsample}")
    print(f"images {a.n_images}  postings {b['n_postings']} "
          f"({b['n_postings'] / a.n_images:.0f}/image)  {model}")
    print(f"bytes/posting {bpp:.2f} (original invidx: 8)  index {ib['total_bytes'] / 2**20:.0f}"
          f" MiB  build {b['build_s']:.1f} s  peak RSS {b['peak_rss_gib']:.2f} GiB  "
          f"load {q['load_ms']:.1f} ms")
    print(f"uint16 weights vs float64 scores ({min(a.n_images, 5000)} images, box-of-a-db-image "
          f"queries): max |err| {qe['max_abs_err']:.2e} (bound {qe['err_bound']:.2e}), mean "
          f"{qe['mean_abs_err']:.2e}; source image first {qe['source_first']}; top-100 identical "
          f"{qe['top100_identical']}, overlap {qe['top100_overlap']:.3f}")
    for name in ("box", "full"):
        r = q[name]
        print(f"{name:4s} query: {r['distinct_words']:.0f} words, {r['postings_touched']:.0f} "
              f"postings touched; scores {r['scores_ms']:.1f} ms wall, {r['scores_cpu_ms']:.1f}"
              f" ms CPU ({r['cpu_ns_per_posting']:.1f} ns/posting), full ranking "
              f"{r['search_ms']:.1f} ms, top-100 {r['search_top100_ms']:.1f} ms (medians of "
              f"{a.queries})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    row = {"n_images": a.n_images,
           **({"real_maps": str(a.real_maps)} if a.real_maps else
              {"zipf_s": a.zipf_s, "zipf_r0": a.zipf_r0, "upsample": a.upsample}),
           "n_postings": b["n_postings"], "bytes_per_posting": round(bpp, 3),
           "index_bytes": ib["total_bytes"], "build_s": round(b["build_s"], 2),
           "peak_rss_gib": round(b["peak_rss_gib"], 3), "load_ms": round(q["load_ms"], 2),
           **qe}
    for name in ("box", "full"):
        for k, v in q[name].items():
            row[f"{name}_{k}"] = round(v, 3)
    path = a.csv or RESULTS / ("inverted_file_real.csv" if a.real_maps else "inverted_file.csv")
    append_csv_row(path, row)
    plot_query_cost(path)
    print(f"wrote {path} and {path.parent / 'query_cost.png'}")


def append_csv_row(path: Path, row: dict) -> None:
    """Add ``row`` to the results CSV at ``path``. A row with columns the file lacks
    rewrites the file with the union of the columns (older rows leave the new ones
    empty): appending it under the old header would shift every value after the first
    new column into the wrong one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    fields: list[str] = []
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            r = csv.DictReader(f)
            fields, rows = list(r.fieldnames or []), list(r)
    union = fields + [k for k in row if k not in fields]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=union, restval="")
        w.writeheader()
        w.writerows([*rows, row])


def plot_query_cost(path: Path) -> None:
    """CPU time of ``scores`` against postings touched, every row of the CSV so far."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    pts = sorted((float(r[f"{k}_postings_touched"]), float(r[f"{k}_scores_cpu_ms"]))
                 for r in rows for k in ("box", "full") if r.get(f"{k}_scores_cpu_ms"))
    if pts:
        line_plot(path.parent / f"{path.stem.replace('inverted_file', 'query_cost')}.png",
                  {"scores(), CPU ms": ([p[0] for p in pts], [p[1] for p in pts])},
                  "query cost is linear in the postings touched (one core)",
                  "postings touched", "ms")


if __name__ == "__main__":
    main()
