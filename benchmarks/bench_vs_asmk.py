"""Query time of BLCF's inverted file against asmk 0.1.1 (ASMK, binary, the HOW setting)
on the same local features and the same codebook, one core.

Optional: needs ``pip install asmk==0.1.1`` in the venv (not a project dependency).

Part 1, SMVS-like (500 images): synthetic 512-D local features, 42x32 per image, each
the L2-normalised sum of a codebook centroid and Gaussian noise; the centroid's word is
drawn from the Zipf law of bench_inverted_file.py. Both methods get those word ids (the
quantisation step, identical for both, is not timed). BLCF: centre-prior BoW, our
inverted file. asmk: ``Codebook.initialize_from_state`` with our centroids, its kernel
(residual aggregation per word, binarised) and its IVF, built and queried through its
own code. Timed per query: BoW/aggregation of the query's words + search, as CPU time
of this process (time.process_time: robust to other jobs on a shared box), in two regimes
that give both systems the same output: the full ranking (what the mAP protocol needs)
and the top --top images (what a search service returns; asmk: ``topk=``, BLCF:
``search_top``).

Protocol: blocks. Each system runs all queries back to back, as its own query loop
would (warm caches); the systems alternate blocks, first one then the other, --reps
times, so a slow phase of a shared box hits both; the figure is the median over all
queries and blocks. (Interleaving single calls instead lets asmk's ~2 ms of Python
evict BLCF's working set before every BLCF call, a cost no real query loop pays.)

Part 2, 105k images: asmk's build is a per-descriptor Python loop (~1e8 postings here),
infeasible on this box, so its IVF state is filled directly with the posting lists of
our 105k synthetic index (same image ids per word) and random binary residual codes of
--large-dim bits (128 by default, as in HOW; asmk's per-posting cost grows with the
dimension, so this favours asmk; 128 is also the PCA size of settings/smvs_dvd.json).
Its ``IVF.search`` is then timed unchanged. Part 2 also times ``np.sort`` of one BLCF
query's float32 scores (values only): a floor for any exact full ranking in numpy, to
set against asmk's time / 20.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vs_asmk.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vs_asmk.py --real-maps STORE \
        --workdir /tmp/asmk-real    # word maps: relabelled real maps (bench_inverted_file)
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_inverted_file import (
    MAP_H,
    MAP_W,
    RESULTS,
    K,
    make_generator,
    measure_build,
    time_blocks,
)
from lib.allocator import retain_freed_memory
from lib.index.bow import bow_vector
from lib.index.inverted_file import InvertedFile


def _asmk():
    try:
        import asmk  # noqa: F401
        from asmk import codebook, hamming, index, inverted_file, kernel
    except ImportError:
        print("asmk is not installed: this optional benchmark needs "
              "`.venv/bin/pip install asmk==0.1.1` (not a project dependency)")
        raise SystemExit(0) from None
    return codebook, hamming, index, inverted_file, kernel


def _features(centroids: np.ndarray, words: np.ndarray, rng: np.random.Generator,
              noise: float = 0.05) -> np.ndarray:
    x = centroids[words] + noise * rng.standard_normal((words.size, centroids.shape[1]),
                                                       dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def part_small(n_images: int, n_queries: int, dim: int, seed: int, top: int, reps: int,
               real_maps: Path | None = None) -> dict:
    codebook, _, index, inverted_file, kernel = _asmk()
    rng = np.random.default_rng(seed)
    gen = make_generator(real_maps, 0.9, 10.0, seed)
    cent = rng.standard_normal((K, dim), dtype=np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    words = gen.maps(rng, n_images)  # (n, 1344)
    prior = gen.prior
    # BLCF index
    work = Path(tempfile.mkdtemp(prefix="blcf-bench-asmk-"))
    try:
        t = time.perf_counter()
        vecs = gen.vectors_of(words, prior)
        ivf = InvertedFile.build(work / "ivf", vecs, K, [f"i{i}" for i in range(n_images)], {})
        blcf_build = time.perf_counter() - t
        # asmk with our codebook
        cdb = codebook.Codebook.initialize_from_state(
            {"type": "Codebook", "params": {"size": K}, "state": {"centroids": cent}},
            index_factory=index.initialize_index(None))
        kern = kernel.ASMKKernel(cdb, binary=True)
        aivf = inverted_file.IVF.initialize_empty(codebook_size=K, use_idf=False)
        t = time.perf_counter()
        for c0 in range(0, n_images, 50):  # chunks keep the float features small
            w = words[c0:c0 + 50].ravel()
            des = _features(cent, w, rng)
            imids = np.repeat(np.arange(c0, c0 + min(50, n_images - c0)), MAP_H * MAP_W)
            agg = kern.aggregate(des, w[:, None], imids)
            aivf.add(*agg)
        asmk_build = time.perf_counter() - t
        # queries: box words (30x24) of fresh images, same features for both
        qw = gen.maps(np.random.default_rng([seed, 7]), n_queries, 30, 24)
        des = [_features(cent, q, rng) for q in qw]
        sim = {"alpha": 3.0, "similarity_threshold": 0.0}

        def asmk_query(i: int, topk: int | None) -> None:
            ades, ids = kern.aggregate_image(des[i], qw[i][:, None])
            aivf.search(ades, ids, topk=topk,
                        similarity_func=lambda *x: kern.similarity(*x, **sim))

        ms = time_blocks({
            "blcf_ms": lambda i: ivf.search(bow_vector(qw[i], K)),
            "asmk_ms": lambda i: asmk_query(i, None),
            "blcf_top_ms": lambda i: ivf.search_top(bow_vector(qw[i], K), top),
            "asmk_top_ms": lambda i: asmk_query(i, top)}, n_queries, reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"images": n_images, "blcf_build_s": blcf_build, "asmk_build_s": asmk_build, **ms}


def part_large(n_images: int, n_queries: int, bits: int, seed: int, top: int, reps: int,
               workdir: Path | None, real_maps: Path | None = None) -> dict:
    _, hamming, _, inverted_file, kernel = _asmk()
    work = workdir or Path(tempfile.mkdtemp(prefix="blcf-bench-asmk-"))
    try:
        path = work / "index"
        if not (path / "meta.json").exists():
            measure_build(path, n_images, 0.9, 10.0, seed, real_maps=real_maps)
        ivf = InvertedFile.load(path)
        if ivf.header["meta"].get("real_maps") != (str(real_maps) if real_maps else None):
            raise SystemExit(f"{path}: built from another word model; use another --workdir")
        rng = np.random.default_rng(seed)
        n32 = bits // 32
        off = ivf.offsets
        ivf_ids, ivf_vecs = [], []
        for w in range(ivf.n_words):  # asmk's own layout: one array pair per word
            d = np.asarray(ivf.docs[off[w]:off[w + 1]]).astype(np.int64)
            ivf_ids.append(d if d.size else None)
            ivf_vecs.append(rng.integers(0, 2**32, (d.size, n32), dtype=np.uint32)
                            if d.size else None)
        counts = np.diff(off).astype(np.int32)
        norm = np.bincount(np.asarray(ivf.docs), minlength=ivf.n_docs).astype(np.float64)
        aivf = inverted_file.IVF.initialize_from_state({
            "type": "IVF", "params": {"use_idf": False},
            "state": {"norm_factor": norm, "n_images": ivf.n_docs, "ivf_vecs": ivf_vecs,
                      "ivf_image_ids": ivf_ids, "counts": counts,
                      "idf": np.ones(ivf.n_words, np.float32), "imid_offset": 0}})

        class _Kern:  # ASMKKernel.similarity needs only .binary
            binary = True

        sim = {"alpha": 3.0, "similarity_threshold": 0.0}
        gen = make_generator(real_maps, 0.9, 10.0, seed)
        qv = [bow_vector(q, K) for q in gen.maps(np.random.default_rng([seed, 7]),
                                                  n_queries, 30, 24)]
        codes = [rng.integers(0, 2**32, (v[0].size, n32), dtype=np.uint32) for v in qv]

        def asmk_query(i: int, topk: int | None) -> None:
            aivf.search(codes[i], qv[i][0].astype(np.int64), topk=topk,
                        similarity_func=lambda *x: kernel.ASMKKernel.similarity(
                            _Kern, *x, **sim))

        scores = [ivf.scores(v) for v in qv]
        ms = time_blocks({
            "sort_floor_ms": lambda i: np.sort(scores[i]),
            "blcf_ms": lambda i: ivf.search(qv[i]),
            "asmk_ms": lambda i: asmk_query(i, None),
            "blcf_top_ms": lambda i: ivf.search_top(qv[i], top),
            "asmk_top_ms": lambda i: asmk_query(i, top)}, n_queries, reps)
        touched = [ivf.postings_touched(v) for v in qv]
        del hamming
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return {"images": n_images, "touched": float(np.median(touched)), **ms}


def _report(r: dict) -> None:
    for regime, b, x in (("full ranking", "blcf_ms", "asmk_ms"),
                         ("top-k", "blcf_top_ms", "asmk_top_ms")):
        print(f"  query CPU time ({regime}): BLCF {r[b]:.3f} ms, asmk {r[x]:.2f} ms -> "
              f"BLCF {r[x] / r[b]:.1f}x faster", flush=True)
    if "sort_floor_ms" in r:
        print(f"  np.sort of one query's scores alone (values, no indices): "
              f"{r['sort_floor_ms']:.3f} ms; asmk / 20 = {r['asmk_ms'] / 20:.3f} ms")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=500, help="images in part 1")
    ap.add_argument("--large", type=int, default=105_000, help="images in part 2 (0: skip)")
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--dim", type=int, default=512, help="local feature dimension, part 1")
    ap.add_argument("--large-dim", type=int, default=128,
                    help="bits of asmk's binary codes in part 2 (multiple of 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=100, help="images returned, top-k regime")
    ap.add_argument("--reps", type=int, default=5, help="timed blocks per system")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="reuse/keep the part-2 BLCF index here (default: temporary)")
    ap.add_argument("--real-maps", type=Path, default=None,
                    help="word maps from a step-C store of 42x32 maps, relabelled "
                    "(bench_inverted_file.RealMaps), instead of the Zipf model")
    a = ap.parse_args(argv)
    _asmk()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    retain_freed_memory()  # as the pipeline scripts do (lib/allocator.py)
    rows = []
    data = f"real:{a.real_maps.name}" if a.real_maps else "zipf"
    s = part_small(a.small, a.queries, a.dim, a.seed, a.top, a.reps, a.real_maps)
    print(f"{s['images']} images, {a.dim}-D: build (wall) BLCF {s['blcf_build_s']:.1f} s, asmk "
          f"{s['asmk_build_s']:.1f} s", flush=True)
    _report(s)
    rows.append({"part": "smvs_like", "data": data, "top": a.top, **s})
    if a.large:
        g = part_large(a.large, a.queries, a.large_dim, a.seed, a.top, a.reps, a.workdir,
                       a.real_maps)
        print(f"{g['images']} images ({g['touched']:.0f} postings touched per box query), "
              f"asmk {a.large_dim}-bit codes")
        _report(g)
        rows.append({"part": "large", "data": data, "top": a.top, **g})
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    out = RESULTS / ("vs_asmk_real.csv" if a.real_maps else "vs_asmk.csv")
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
