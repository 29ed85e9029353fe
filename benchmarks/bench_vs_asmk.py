"""Query time of BLCF's inverted file against asmk 0.1.1 (ASMK, binary, the HOW setting)
on the same local features and the same codebook, one core.

Optional: needs ``pip install asmk==0.1.1`` in the venv (not a project dependency).

Part 1, SMVS-like (500 images): synthetic 512-D local features, 42x32 per image, each
the L2-normalised sum of a codebook centroid and Gaussian noise; the centroid's word is
drawn from the Zipf law of bench_inverted_file.py. Both methods get those word ids (the
quantisation step, identical for both, is not timed). BLCF: centre-prior BoW, our
inverted file. asmk: ``Codebook.initialize_from_state`` with our centroids, its kernel
(residual aggregation per word, binarised) and its IVF, built and queried through its
own code. Timed per query: BoW/aggregation of the query's words + search (full ranking),
as CPU time of this process (time.process_time: robust to other jobs on a shared box).

Part 2, 105k images: asmk's build is a per-descriptor Python loop (~1e8 postings here),
infeasible on this box, so its IVF state is filled directly with the posting lists of
our 105k synthetic index (same image ids per word) and random binary residual codes of
--large-dim bits (128 by default, as in HOW; asmk's per-posting cost grows with the
dimension, so this favours asmk). Its ``IVF.search`` is then timed unchanged.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vs_asmk.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vs_asmk.py --real-maps STORE \
        --workdir /tmp/asmk-real    # word maps: relabelled real maps (bench_inverted_file)
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_inverted_file import MAP_H, MAP_W, RESULTS, K, make_generator, measure_build

from lib.bow import bow_vector
from lib.inverted_file import InvertedFile


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


def part_small(n_images: int, n_queries: int, dim: int, seed: int,
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
        sim = {"alpha": 3.0, "similarity_threshold": 0.0}
        t_b, t_a = [], []
        for q in qw:
            des = _features(cent, q, rng)
            for _ in range(2):  # rotation, first pass warms both
                a = time.process_time()
                ivf.search(bow_vector(q, K))
                b = time.process_time()
                ades, ids = kern.aggregate_image(des, q[:, None])
                aivf.search(ades, ids, topk=None,
                            similarity_func=lambda *x: kern.similarity(*x, **sim))
                c = time.process_time()
            t_b.append(b - a)
            t_a.append(c - b)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"images": n_images, "blcf_build_s": blcf_build, "asmk_build_s": asmk_build,
            "blcf_ms": 1000 * float(np.median(t_b)), "asmk_ms": 1000 * float(np.median(t_a))}


def part_large(n_images: int, n_queries: int, bits: int, seed: int, workdir: Path | None,
               real_maps: Path | None = None) -> dict:
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
        qw = gen.maps(np.random.default_rng([seed, 7]), n_queries, 30, 24)
        t_b, t_a, touched = [], [], []
        for q in qw:
            qv = bow_vector(q, K)
            codes = rng.integers(0, 2**32, (qv[0].size, n32), dtype=np.uint32)
            for _ in range(2):
                a = time.process_time()
                ivf.search(qv)
                b = time.process_time()
                aivf.search(codes, qv[0].astype(np.int64), topk=None,
                            similarity_func=lambda *x: kernel.ASMKKernel.similarity(
                                _Kern, *x, **sim))
                c = time.process_time()
            t_b.append(b - a)
            t_a.append(c - b)
            touched.append(ivf.postings_touched(qv))
        del hamming
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return {"images": n_images, "touched": float(np.median(touched)),
            "blcf_ms": 1000 * float(np.median(t_b)), "asmk_ms": 1000 * float(np.median(t_a))}


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
    ap.add_argument("--workdir", type=Path, default=None,
                    help="reuse/keep the part-2 BLCF index here (default: temporary)")
    ap.add_argument("--real-maps", type=Path, default=None,
                    help="word maps from a step-C store of 42x32 maps, relabelled "
                    "(bench_inverted_file.RealMaps), instead of the Zipf model")
    a = ap.parse_args(argv)
    _asmk()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    s = part_small(a.small, a.queries, a.dim, a.seed, a.real_maps)
    print(f"{s['images']} images, {a.dim}-D: build (wall) BLCF {s['blcf_build_s']:.1f} s, asmk "
          f"{s['asmk_build_s']:.1f} s; query CPU time (box, full ranking) BLCF "
          f"{s['blcf_ms']:.2f} ms, "
          f"asmk {s['asmk_ms']:.1f} ms -> BLCF {s['asmk_ms'] / s['blcf_ms']:.0f}x faster",
          flush=True)
    data = f"real:{a.real_maps.name}" if a.real_maps else "zipf"
    rows.append({"part": "smvs_like", "data": data, **s})
    if a.large:
        g = part_large(a.large, a.queries, a.large_dim, a.seed, a.workdir, a.real_maps)
        print(f"{g['images']} images ({g['touched']:.0f} postings touched per box query), "
              f"asmk {a.large_dim}-bit codes, query CPU time: BLCF {g['blcf_ms']:.1f} ms, asmk "
              f"{g['asmk_ms']:.1f} ms -> BLCF {g['asmk_ms'] / g['blcf_ms']:.1f}x faster")
        rows.append({"part": "large", "data": data, **g})
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
