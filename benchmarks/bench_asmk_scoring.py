"""Query cost of kernel = asmk against BoW on the same databases, and against the asmk
package end to end.

Mode 1 (default): scoring at Oxford105k / 1M size. The database is the one of
bench_inverted_file.py, made with its generators (imported): ``--real-maps STORE`` for
the real-shape model (``RealMaps``, relabelled real 42x32 maps), otherwise the Zipf
model. Two indexes are built for the same images in ``--workdir`` (kept and reused when
given, else a temporary folder):

* the BoW inverted file, built as bench_inverted_file.py builds it (``measure_build``:
  a child process that reports its peak RSS), 6 bytes a posting;
* in the same folder, the ASMK postings of the same images, written by step C's own
  ``lib.index.step.write_signatures``. A stand-in for the assignment store gives it
  each image's distinct words (those of its BoW vector) with a random signature of
  ``--bits`` bits per word (128: 16 bytes). The arrays are asmk_offsets and the
  memory-mapped asmk_docs, asmk_signatures and asmk_weights (the reference kernel's
  1/sqrt(n_d), a float32 per posting). ``InvertedFile.load`` opens both indexes.

Queries: box queries (the central 30x24 cells) and full queries (the whole 42x32 map),
the same images for both kernels. The BoW query is the words of the query map, counts
L2-normalised: the queries of bench_inverted_file.py. The ASMK query's word set is the
union of the 5 nearest words of each of its features (query multiple assignment 5,
exact L2, ``lib.index.asmk.query_words``), with a random signature per word. How the
features are modelled:

* real-shape model: the real features of the query's source map, read from the feature
  store and the models of the run that made STORE (``<run>/features/*.lmdb``,
  ``<run>/models``; ``--features`` and ``--models`` override) as step C reads them. Their
  5 nearest words on the run's real codebook are relabelled by the same df-stratum
  bijection that RealMaps applied to that query's map. So the MA-5 set has the real
  codebook's neighbour structure, and the words have the df law of the synthetic
  database.
* Zipf model: no real features exist. The features are those of bench_vs_asmk.py: each
  cell is its word's centroid plus Gaussian noise (``--noise``), L2-normalised, on a
  random unit codebook of ``--dim`` dimensions. The 4 other words of a feature are then
  its centroid's nearest centroids, reordered by the noise, and unrelated to the df law.

Timed per query as CPU time on one thread, with the alternating-block protocol of
``bench_inverted_file.time_blocks``: each contender runs all queries back to back, and
the contenders alternate in blocks (forward, then backward) ``--reps`` times. The
contenders are BoW ``InvertedFile.scores``, ASMK ``InvertedFile.asmk_scores`` (alpha 3,
tau 0), ``rank_scores`` of one score vector, and each kernel's scores followed by the
full ranking. Reported: medians (from time_blocks), the p95 of all timed calls, the p95
over queries of each query's median, the ratio ASMK / BoW (goal <= 5x), words and
postings touched, ns per posting, and bytes per posting.

Mode 2 (``--vs-asmk``, at most 110,000 images: asmk's IVF build is a per-descriptor Python
loop) times box queries end to end, asmk 0.1.1 against ours, on the same random features
and codebook. The model is that of part 1 of bench_vs_asmk.py: K = 25,000 random unit
words of ``--dim`` dimensions, each feature its map word's centroid plus noise; the
database maps come from the word model, and both systems index the same features under
the same words. The default noise (0.005 per dimension, not bench_vs_asmk's 0.05) is set
so that a box query's MA-5 word set is about as large as real features make it: 6.3
times its distinct nearest words (real SMVS features on a real 25k codebook: 6.4x;
noise 0.05 gives 20x, which would inflate asmk's per-word Python loops).

asmk: ``Codebook.quantize`` (MA 5, faiss IndexFlatL2), then
``ASMKKernel.aggregate_image``, then ``IVF.search``. Ours: ``query_words`` (the same
faiss IndexFlatL2) or ``Codebook.nearest`` (approximate mode, the shortlist tuned by
``Codebook.tune`` on database features, as step C tunes it: 97 % agreement on the
nearest word), then ``aggregate``, ``score_postings`` and ``rank_scores`` (or ``top_k``).
Each stage is also timed alone. Checks: asmk's scores against ours (same words), and the
approximate MA word sets against the exact ones (Jaccard index: the shortlist is tuned
for the nearest word, not for the 5 nearest).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_asmk_scoring.py \\
        --real-maps STORE --n 105000 --workdir DIR
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_asmk_scoring.py --vs-asmk --n 500 \\
        [--real-maps STORE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import scipy

from benchmarks.bench_inverted_file import (
    MAP_H,
    MAP_W,
    RESULTS,
    RealMaps,
    SyntheticMaps,
    make_generator,
    measure_build,
    time_blocks,
)
from benchmarks.bench_vs_asmk import _asmk, _features
from lib.allocator import retain_freed_memory
from lib.artefacts import library_versions
from lib.index.asmk import (
    DEFAULT_ALPHA,
    DEFAULT_QUERY_MA,
    DEFAULT_TAU,
    aggregate,
    build_postings,
    centroid_index,
    query_words,
    score_postings,
    signature_bytes,
)
from lib.index.inverted_file import (
    ASMK_DOCS,
    ASMK_OFFSETS,
    ASMK_SIGNATURES,
    ASMK_WEIGHTS,
    InvertedFile,
    top_k,
)
from lib.index.native import build_variant
from lib.index.step import write_signatures
from lib.search.rankings import rank_scores

MACHINE = "2-core x86_64 CPU, 24 GB RAM, no GPU"
BOX = (30, 24)  # box queries: the central 30x24 cells, as in bench_inverted_file.py
MARKER = "asmk_bench.json"  # written last: the ASMK arrays of the folder are complete
QUERY_SEED = 1 << 40  # the rng seed of SyntheticMaps.queries / RealMaps' query draws


# --------------------------------------------------------------------------- timing

def time_spread(calls: dict[str, Callable[[int], object]], n_queries: int,
                reps: int) -> dict[str, dict[str, float]]:
    """``time_blocks`` (its median CPU ms per query), with every call also recorded, for
    the spread: the p95 of all timed calls (the shared box's slow phases included), the
    p95 and maximum over queries of each query's median (how much queries differ), and
    the median wall time."""
    cpu: dict[str, list[float]] = {n: [] for n in calls}
    wall: dict[str, list[float]] = {n: [] for n in calls}

    def wrap(name: str, f: Callable[[int], object]) -> Callable[[int], object]:
        def g(i: int) -> object:
            w, c = time.perf_counter(), time.process_time()
            out = f(i)
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
            return out
        return g

    med = time_blocks({n: wrap(n, f) for n, f in calls.items()}, n_queries, reps)
    out = {}
    for n in calls:
        c = 1000 * np.asarray(cpu[n][n_queries:])  # the first pass is time_blocks' warm-up
        per_query = np.median(c.reshape(reps, n_queries), axis=0)
        out[n] = {"median_ms": med[n], "p95_ms": float(np.percentile(c, 95)),
                  "query_median_p95_ms": float(np.percentile(per_query, 95)),
                  "query_median_max_ms": float(per_query.max()),
                  "wall_median_ms": 1000 * float(np.median(wall[n][n_queries:]))}
    return out


# --------------------------------------------------------------------------- ASMK postings

class SignatureSource:
    """A stand-in for the AssignmentStore that ``write_signatures`` reads. Image i
    ("synthetic/0000012", the BoW index's ids) has the distinct words of its BoW vector
    (``gen.stream``, hence the BoW index's postings) and a random signature per word.
    Both are generated on the fly in database order: write_signatures reads every image
    in order, twice, and image 0 restarts the seeded streams, so both passes get the
    same data."""

    def __init__(self, gen: SyntheticMaps, n_images: int, n_bytes: int, seed: int) -> None:
        self.path = Path(f"<{n_images} synthetic images>")
        self.gen, self.n, self.n_bytes, self.seed = gen, n_images, n_bytes, seed
        self._words: Iterator[np.ndarray] = iter(())
        self._rng = np.random.default_rng([seed, 3])
        self._next = 0

    def get_signature(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        i = int(image_id.rsplit("/", 1)[1])
        if i == 0:
            self._words = (v[0] for v in self.gen.stream(self.n))
            self._rng = np.random.default_rng([self.seed, 3])
            self._next = 0
        if i != self._next:
            raise RuntimeError(f"image {i} read out of order (expected {self._next})")
        self._next += 1
        w = next(self._words)
        return w, self._rng.integers(0, 256, (w.size, self.n_bytes), dtype=np.uint8)


def build_asmk(index: Path, gen: SyntheticMaps, n_images: int, n_bits: int, seed: int,
               data: str) -> dict[str, Any]:
    """The ASMK arrays beside the BoW files of ``index`` (reused when the marker says they
    were made with the same parameters)."""
    want = {"n_images": n_images, "n_bits": n_bits, "seed": seed, "data": data}
    marker = index / MARKER
    if marker.exists() and json.loads(marker.read_text()) == want:
        return {"reused": True}
    marker.unlink(missing_ok=True)
    for name in (ASMK_OFFSETS, ASMK_DOCS, ASMK_SIGNATURES, ASMK_WEIGHTS):
        (index / name).unlink(missing_ok=True)
    ids = [f"synthetic/{i:07d}" for i in range(n_images)]
    src = SignatureSource(gen, n_images, signature_bytes(n_bits), seed)
    t, c = time.perf_counter(), time.process_time()
    write_signatures(index, src, ids, n_bits, gen.k)  # type: ignore[arg-type]
    out = {"reused": False, "wall_s": time.perf_counter() - t,
           "cpu_s": time.process_time() - c,
           "process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    marker.write_text(json.dumps(want) + "\n")
    return out


def index_sizes(index: Path, ivf: InvertedFile) -> dict[str, Any]:
    """Bytes per posting (payload: doc id + weight, + signature for ASMK) and file sizes."""
    sz = {p.name: p.stat().st_size for p in index.iterdir() if p.is_file()}
    assert (ivf.asmk_docs is not None and ivf.asmk_signatures is not None
            and ivf.asmk_weights is not None)
    n_a = int(ivf.asmk_docs.size)
    bow_payload = ivf.docs.nbytes + ivf.weights.nbytes
    asmk_payload = ivf.asmk_docs.nbytes + ivf.asmk_signatures.nbytes + ivf.asmk_weights.nbytes
    asmk_files = sum(sz[n] for n in (ASMK_OFFSETS, ASMK_DOCS, ASMK_SIGNATURES, ASMK_WEIGHTS))
    return {"bow_postings": ivf.n_postings, "asmk_postings": n_a,
            "bow_bytes_per_posting": bow_payload / ivf.n_postings,
            "asmk_bytes_per_posting": asmk_payload / n_a,
            "asmk_signature_bytes": int(ivf.asmk_signatures.shape[1]),
            "asmk_doc_bytes": ivf.asmk_docs.itemsize,
            "asmk_weight_bytes": ivf.asmk_weights.itemsize,
            "asmk_bytes_per_posting_all_files": asmk_files / n_a,
            "bow_files_bytes": sum(sz[n] for n in ("docs.npy", "weights.npy", "offsets.npy")),
            "asmk_files_bytes": asmk_files}


# --------------------------------------------------------------------------- query models

def relabel(gen: RealMaps, words: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """RealMaps' bijection of one image (``shift``: its shift per df stratum) applied to
    word ids of the real codebook."""
    g = gen.stratum[words]
    return gen.members[g, (gen.rank[words] + shift[g]) % gen.counts[g]]


def real_query_sets(gen: RealMaps, store: Path, features: Path | None, models: Path | None,
                    n_queries: int, ma: int) -> tuple[list, list, dict[str, Any]]:
    """MA-``ma`` word sets of the box and full queries from the real features of each
    query's source map (see the module docstring)."""
    from lib.features.feature_store import FeatureStore
    from lib.features.local_features import LocalFeatureReader
    from lib.index.assignment_store import AssignmentStore
    from lib.vocabulary.codebook import Codebook
    from lib.vocabulary.pca import PCAWhitening

    run = store.parent
    models = models or run / "models"
    if features is None:
        found = sorted((run / "features").glob("*.lmdb"))
        if len(found) != 1:
            raise SystemExit(f"{run / 'features'}: {len(found)} feature stores; pass --features")
        features = found[0]
    with AssignmentStore(store) as st:
        ids = st.ids()
    # RealMaps.maps' draws for SyntheticMaps.queries: the sources, then a shift per stratum
    rng = np.random.default_rng([gen.seed, QUERY_SEED])
    src = rng.integers(0, len(gen.real), n_queries)
    shift = rng.integers(0, 1 << 30, (n_queries, len(gen.members)))
    maps = gen.maps(np.random.default_rng([gen.seed, QUERY_SEED]), n_queries)
    for q in range(n_queries):
        if not np.array_equal(relabel(gen, gen.real[src[q]], shift[q]), maps[q]):
            raise SystemExit("RealMaps draws its queries differently now; update "
                             "real_query_sets")
    cb = Codebook.load(models / "codebook.npy")
    pca = PCAWhitening.load(models / "pca.npz")
    reader = LocalFeatureReader(FeatureStore(features), [MAP_H, MAP_W], l2norm=True, pca=pca)
    index = centroid_index(cb.centroids)
    y0, x0 = (MAP_H - BOX[0]) // 2, (MAP_W - BOX[1]) // 2
    box_sets, full_sets, agree = [], [], 0
    ma1 = {"box": [], "full": []}
    for q in range(n_queries):
        x, (h, w) = reader.features_and_shape(ids[src[q]])
        x = x.reshape(h, w, -1)
        if h < w:  # landscape: RealMaps transposes its map to portrait
            x = x.transpose(1, 0, 2)
        if x.shape[:2] != (MAP_H, MAP_W):
            raise SystemExit(f"{features}: a {h}x{w} map for '{ids[src[q]]}'")
        nn = query_words(index, x.reshape(MAP_H * MAP_W, -1), ma)
        agree += int(np.sum(nn[:, 0] == gen.real[src[q]]))
        lab = relabel(gen, nn, shift[q]).reshape(MAP_H, MAP_W, ma)
        box = lab[y0:y0 + BOX[0], x0:x0 + BOX[1]]
        full_sets.append(np.unique(lab))
        box_sets.append(np.unique(box))
        ma1["full"].append(np.unique(lab[..., 0]).size)
        ma1["box"].append(np.unique(box[..., 0]).size)
    info = {"model": "real features of the query's source map, MA on the run's real codebook, "
                     "relabelled by the query's df-stratum bijection",
            "features": str(features), "models": str(models), "feature_dim": cb.dim,
            "nn1_agrees_with_stored_map": agree / (n_queries * MAP_H * MAP_W),
            "ma1_words_box": float(np.median(ma1["box"])),
            "ma1_words_full": float(np.median(ma1["full"]))}
    return box_sets, full_sets, info


def random_query_sets(gen: SyntheticMaps, n_queries: int, ma: int, dim: int, noise: float,
                      seed: int) -> tuple[list, list, dict[str, Any]]:
    """MA-``ma`` word sets of the box and full queries (the cell maps of
    ``gen.queries``) from bench_vs_asmk.py's random features on a random codebook."""
    rng = np.random.default_rng([seed, 5])
    cent = rng.standard_normal((gen.k, dim), dtype=np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    index = centroid_index(cent)
    out: dict[str, list] = {"box": [], "full": []}
    ma1: dict[str, list] = {"box": [], "full": []}
    for name, hw in (("box", BOX), ("full", (MAP_H, MAP_W))):
        for m in gen.maps(np.random.default_rng([gen.seed, QUERY_SEED]), n_queries, *hw):
            nn = query_words(index, _features(cent, m, rng, noise), ma)
            out[name].append(np.unique(nn))
            ma1[name].append(np.unique(nn[:, 0]).size)
    info = {"model": f"bench_vs_asmk features: random unit {dim}-D codebook, centroid + "
                     f"N(0, {noise}^2) per dimension, L2-normalised",
            "ma1_words_box": float(np.median(ma1["box"])),
            "ma1_words_full": float(np.median(ma1["full"]))}
    return out["box"], out["full"], info


# --------------------------------------------------------------------------- mode 1

def run_scoring(a: argparse.Namespace) -> dict[str, Any]:
    gen = make_generator(a.real_maps, 0.9, 10.0, a.seed)
    data = f"real:{a.real_maps}" if a.real_maps else "zipf s=0.9 r0=10"
    work = a.workdir or Path(tempfile.mkdtemp(prefix="blcf-bench-asmk-scoring-"))
    try:
        path = work / "index"
        if (path / "meta.json").exists():
            h = json.loads((path / "meta.json").read_text())
            if (h["n_docs"] != a.n or h["meta"].get("seed") != a.seed
                    or h["meta"].get("upsample", 1) != 1
                    or h["meta"].get("real_maps") != (str(a.real_maps) if a.real_maps else None)):
                raise SystemExit(f"{path}: built with other parameters; use another --workdir")
            bow_build: dict[str, Any] = {"reused": True}
        else:
            print(f"building the BoW inverted file of {a.n} images in {path} ...", flush=True)
            bow_build = {"reused": False, **measure_build(path, a.n, 0.9, 10.0, a.seed,
                                                          real_maps=a.real_maps)}
        print("writing the ASMK postings (lib.index.step.write_signatures) ...", flush=True)
        asmk_build = build_asmk(path, gen, a.n, a.bits, a.seed, data)
        ivf = InvertedFile.load(path)
        assert ivf.asmk_offsets is not None and ivf.asmk_docs is not None
        sizes = index_sizes(path, ivf)
        sizes["asmk_same_postings_as_bow"] = bool(
            np.array_equal(ivf.asmk_offsets, ivf.offsets)
            and np.array_equal(ivf.asmk_docs, ivf.docs))
        print(f"{a.n} images: {sizes['bow_postings']} BoW postings, "
              f"{sizes['asmk_postings']} ASMK postings; BoW build {bow_build}; "
              f"ASMK write {asmk_build}", flush=True)
        result = {"data": data, "n_images": a.n, "bits": a.bits, "ma": a.ma,
                  "alpha": a.alpha, "tau": a.tau, "build": {"bow": bow_build,
                                                           "asmk": asmk_build},
                  "sizes": sizes}
        result.update(score_queries(a, gen, ivf))
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return result


def score_queries(a: argparse.Namespace, gen: SyntheticMaps, ivf: InvertedFile
                  ) -> dict[str, Any]:
    nq = a.queries
    t = time.perf_counter()
    if isinstance(gen, RealMaps):
        box_sets, full_sets, model = real_query_sets(gen, a.real_maps, a.features, a.models,
                                                     nq, a.ma)
    else:
        box_sets, full_sets, model = random_query_sets(gen, nq, a.ma, a.dim, a.noise, a.seed)
    print(f"query word sets (MA {a.ma}) in {time.perf_counter() - t:.1f} s: {model}",
          flush=True)
    bow = {"box": gen.queries(nq, BOX), "full": gen.queries(nq, None)}
    rng = np.random.default_rng([a.seed, 9])
    nb = signature_bytes(a.bits)
    asmk = {k: [(w.astype(np.int32), rng.integers(0, 256, (w.size, nb), dtype=np.uint8))
                for w in sets] for k, sets in (("box", box_sets), ("full", full_sets))}
    a_off = ivf.asmk_offsets
    assert a_off is not None

    def asmk_scores(kind: str, i: int) -> np.ndarray:
        w, s = asmk[kind][i]
        return ivf.asmk_scores(w, s, a.alpha, a.tau, a.bits)

    def scored_by(native: Any, kind: str, i: int) -> np.ndarray:
        """The same scores by another scorer: numpy (``native=False``, instead of the
        compiled loop of lib.index.native) or another build of the loop
        (--loop-variants)."""
        w, s = asmk[kind][i]
        return score_postings(w, s, a_off, ivf.asmk_docs, ivf.asmk_signatures,
                              ivf.asmk_weights, ivf.n_docs, a.alpha, a.tau, a.bits,
                              per_doc=False, native=native)

    queries: dict[str, Any] = {"model": model}
    for k in ("box", "full"):
        bt = [ivf.postings_touched(q) for q in bow[k]]
        at = [int((a_off[w + 1] - a_off[w]).sum()) for w, _ in asmk[k]]
        queries[k] = {"bow_words": float(np.median([q[0].size for q in bow[k]])),
                      "asmk_words": float(np.median([w.size for w, _ in asmk[k]])),
                      "bow_postings_touched": float(np.median(bt)),
                      "asmk_postings_touched": float(np.median(at)),
                      "asmk_over_bow_postings": float(np.median(np.divide(at, bt)))}
    print(json.dumps(queries, indent=1), flush=True)
    s_bow = [ivf.scores(q) for q in bow["full"]]
    s_asmk = [asmk_scores("full", i) for i in range(nq)]
    calls: dict[str, Callable[[int], object]] = {
        "bow_box": lambda i: ivf.scores(bow["box"][i]),
        "asmk_box": lambda i: asmk_scores("box", i),
        "bow_full": lambda i: ivf.scores(bow["full"][i]),
        "asmk_full": lambda i: asmk_scores("full", i),
        "asmk_box_numpy": partial(scored_by, False, "box"),
        "asmk_full_numpy": partial(scored_by, False, "full"),
        "rank_bow_scores": lambda i: rank_scores(s_bow[i]),
        "rank_asmk_scores": lambda i: rank_scores(s_asmk[i]),
        "bow_box_ranked": lambda i: ivf.search(bow["box"][i]),
        "asmk_box_ranked": lambda i: rank_scores(asmk_scores("box", i)),
        "bow_full_ranked": lambda i: ivf.search(bow["full"][i]),
        "asmk_full_ranked": lambda i: rank_scores(asmk_scores("full", i)),
    }
    build_dir = Path(tempfile.mkdtemp(prefix="blcf-bench-asmk-loops-"))
    try:
        for j, v in enumerate(a.loop_variants):
            lib = build_variant(build_dir / f"variant{j}.so", v.split())
            for k in ("box", "full"):
                calls[f"asmk_{k}[{v}]"] = partial(scored_by, lib, k)
        t = time.perf_counter()
        tm = time_spread(calls, nq, a.reps)
        print(f"timed in {time.perf_counter() - t:.0f} s", flush=True)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    ratios = {}
    for k in ("box", "full"):
        ratios[f"asmk_over_bow_{k}"] = tm[f"asmk_{k}"]["median_ms"] / tm[f"bow_{k}"]["median_ms"]
        ratios[f"asmk_numpy_over_bow_{k}"] = (tm[f"asmk_{k}_numpy"]["median_ms"]
                                              / tm[f"bow_{k}"]["median_ms"])
        ratios[f"asmk_over_bow_{k}_ranked"] = (tm[f"asmk_{k}_ranked"]["median_ms"]
                                               / tm[f"bow_{k}_ranked"]["median_ms"])
        for kern in ("bow", "asmk"):
            queries[k][f"{kern}_cpu_ns_per_posting"] = (
                1e6 * tm[f"{kern}_{k}"]["median_ms"] / queries[k][f"{kern}_postings_touched"])
    return {"queries": queries, "timings_ms": tm, "ratios": ratios,
            "loop_variants": list(a.loop_variants)}


def report_scoring(r: dict[str, Any]) -> None:
    s, q, t = r["sizes"], r["queries"], r["timings_ms"]
    print(f"\n{r['n_images']} images ({r['data']}): BoW {s['bow_postings']} postings, "
          f"{s['bow_bytes_per_posting']:.2f} bytes each; ASMK {s['asmk_postings']} postings, "
          f"{s['asmk_bytes_per_posting']:.2f} bytes each (doc id {s['asmk_doc_bytes']} + "
          f"signature {s['asmk_signature_bytes']} + weight {s['asmk_weight_bytes']})")
    print("| query | words BoW / ASMK | postings BoW / ASMK | BoW ms (p95) | ASMK ms (p95) | "
          "ASMK / BoW | + ranking: BoW / ASMK ms |")
    print("|---|---|---|---|---|---|---|")
    for k in ("box", "full"):
        b, x = t[f"bow_{k}"], t[f"asmk_{k}"]
        print(f"| {k} | {q[k]['bow_words']:.0f} / {q[k]['asmk_words']:.0f} | "
              f"{q[k]['bow_postings_touched']:.0f} / {q[k]['asmk_postings_touched']:.0f} | "
              f"{b['median_ms']:.2f} ({b['p95_ms']:.2f}) | {x['median_ms']:.2f} "
              f"({x['p95_ms']:.2f}) | {r['ratios'][f'asmk_over_bow_{k}']:.1f}x | "
              f"{t[f'bow_{k}_ranked']['median_ms']:.2f} / "
              f"{t[f'asmk_{k}_ranked']['median_ms']:.2f} |")
    print("ASMK scored by numpy instead of the compiled loop: " + ", ".join(
        f"{k} {t[f'asmk_{k}_numpy']['median_ms']:.2f} ms "
        f"({r['ratios'][f'asmk_numpy_over_bow_{k}']:.1f}x BoW)" for k in ("box", "full")))
    for v in r.get("loop_variants", []):
        print(f"the loop built with -D {v}: " + ", ".join(
            f"{k} {t[f'asmk_{k}[{v}]']['median_ms']:.2f} ms "
            f"({t[f'asmk_{k}[{v}]']['median_ms'] / t[f'asmk_{k}']['median_ms']:.2f}x the "
            "loop in use)" for k in ("box", "full")))
    print(f"rank_scores alone: {t['rank_bow_scores']['median_ms']:.2f} ms (BoW scores), "
          f"{t['rank_asmk_scores']['median_ms']:.2f} ms (ASMK scores); CPU ns per posting: "
          f"BoW {q['box']['bow_cpu_ns_per_posting']:.1f}, "
          f"ASMK {q['box']['asmk_cpu_ns_per_posting']:.1f} (box)")


# --------------------------------------------------------------------------- mode 2

def run_vs_asmk(a: argparse.Namespace) -> dict[str, Any]:
    from lib.vocabulary.codebook import Codebook

    acodebook, _, aindex, ainverted_file, akernel = _asmk()
    rng = np.random.default_rng(a.seed)
    gen = make_generator(a.real_maps, 0.9, 10.0, a.seed)
    k, dim, n, ma, cells = gen.k, a.dim, a.n, a.ma, MAP_H * MAP_W
    cent = rng.standard_normal((k, dim), dtype=np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    words = gen.maps(rng, n)
    cidx = centroid_index(cent)
    acdb = acodebook.Codebook.initialize_from_state(
        {"type": "Codebook", "params": {"size": k}, "state": {"centroids": cent}},
        index_factory=aindex.initialize_index(None))
    kern = akernel.ASMKKernel(acdb, binary=True)
    aivf = ainverted_file.IVF.initialize_empty(codebook_size=k, use_idf=False)
    images: list[tuple[np.ndarray, np.ndarray]] = []
    sample = []
    t_asmk = t_ours = 0.0
    for c0 in range(0, n, 50):  # chunks keep the float features small
        w = words[c0:c0 + 50]
        des = _features(cent, w.ravel(), rng, a.noise)
        if len(sample) < 50:
            sample.append(des[rng.choice(len(des), 200, replace=False)])
        t = time.process_time()
        imids = np.repeat(np.arange(c0, c0 + len(w)), cells)
        aivf.add(*kern.aggregate(des, w.reshape(-1, 1), imids))
        t_asmk += time.process_time() - t
        t = time.process_time()
        images += [aggregate(des[j * cells:(j + 1) * cells], w[j], cent, dim)
                   for j in range(len(w))]
        t_ours += time.process_time() - t
    t = time.process_time()
    offsets, docs, sigs, pw = build_postings(images, k)  # pw: 1/sqrt(n_d) per posting
    t_ours += time.process_time() - t
    del images
    cb = Codebook(cent, "approximate")
    agreement = cb.tune(np.concatenate(sample)[:10000])
    print(f"{n} images, {dim}-D: database aggregated + indexed (CPU) asmk {t_asmk:.1f} s, "
          f"ours {t_ours:.1f} s; {docs.size} postings; approximate MA: {cb.n_candidates} "
          f"candidates ({agreement:.4f} agreement with exact)", flush=True)

    qmaps = gen.maps(np.random.default_rng([a.seed, 7]), a.queries, *BOX)
    qdes = [_features(cent, q, rng, a.noise) for q in qmaps]
    sim = {"alpha": a.alpha, "similarity_threshold": a.tau}

    def simf(*x: Any) -> Any:
        return kern.similarity(*x, **sim)

    def ours_scores(uw: np.ndarray, qs: np.ndarray) -> np.ndarray:
        return score_postings(uw, qs, offsets, docs, sigs, pw, n, a.alpha, a.tau, dim,
                              per_doc=False)  # as InvertedFile.asmk_scores

    def asmk_e2e(i: int, topk: int | None) -> object:
        _, w = acdb.quantize(qdes[i], multiple_assignment=ma)
        return aivf.search(*kern.aggregate_image(qdes[i], w), topk=topk, similarity_func=simf)

    def ours_e2e(i: int, approx: bool, topk: int | None) -> np.ndarray:
        w = cb.nearest(qdes[i], ma) if approx else query_words(cidx, qdes[i], ma)
        s = ours_scores(*aggregate(qdes[i], w, cent, dim))
        return rank_scores(s) if topk is None else top_k(s, topk)

    aw = [acdb.quantize(x, multiple_assignment=ma)[1] for x in qdes]
    ow = [query_words(cidx, x, ma) for x in qdes]
    xw = [cb.nearest(x, ma) for x in qdes]
    ag_a = [kern.aggregate_image(x, w) for x, w in zip(qdes, aw)]
    ag_o = [aggregate(x, w, cent, dim) for x, w in zip(qdes, ow)]
    diffs = []
    for i in range(a.queries):
        ranks, sc = aivf.search(*ag_a[i], topk=None, similarity_func=simf)
        ref = np.zeros(n)
        ref[ranks] = sc
        diffs.append(float(np.abs(ours_scores(*ag_o[i]) - ref).max()))
    check = {
        "words_same_as_asmk": all(np.array_equal(x, y) for x, y in zip(aw, ow)),
        "max_abs_score_diff": max(diffs),
        "approx_ma_word_sets_identical": sum(
            np.array_equal(np.unique(x), np.unique(y)) for x, y in zip(xw, ow)),
        "approx_ma_word_set_jaccard": float(np.mean([
            np.intersect1d(x, y).size / np.union1d(x, y).size for x, y in zip(xw, ow)])),
        "ma1_words": float(np.median([np.unique(w[:, 0]).size for w in ow])),
        "ma_words": float(np.median([g[0].size for g in ag_o])),
        "postings_touched": float(np.median([
            (offsets[g[0] + 1] - offsets[g[0]]).sum() for g in ag_o]))}
    print(json.dumps(check), flush=True)
    top = a.top
    calls: dict[str, Callable[[int], object]] = {
        "asmk_e2e": lambda i: asmk_e2e(i, None),
        "ours_e2e_exact": lambda i: ours_e2e(i, False, None),
        "ours_e2e_approx": lambda i: ours_e2e(i, True, None),
        "asmk_e2e_top": lambda i: asmk_e2e(i, top),
        "ours_e2e_exact_top": lambda i: ours_e2e(i, False, top),
        "ours_e2e_approx_top": lambda i: ours_e2e(i, True, top),
        "asmk_quantise": lambda i: acdb.quantize(qdes[i], multiple_assignment=ma),
        "ours_quantise_exact": lambda i: query_words(cidx, qdes[i], ma),
        "ours_quantise_approx": lambda i: cb.nearest(qdes[i], ma),
        "asmk_aggregate": lambda i: kern.aggregate_image(qdes[i], aw[i]),
        "ours_aggregate": lambda i: aggregate(qdes[i], ow[i], cent, dim),
        "asmk_search": lambda i: aivf.search(*ag_a[i], topk=None, similarity_func=simf),
        "ours_search": lambda i: rank_scores(ours_scores(*ag_o[i])),
    }
    t = time.perf_counter()
    tm = time_spread(calls, a.queries, a.reps)
    print(f"timed in {time.perf_counter() - t:.0f} s", flush=True)
    med = {k: v["median_ms"] for k, v in tm.items()}
    speedups = {
        "e2e_exact": med["asmk_e2e"] / med["ours_e2e_exact"],
        "e2e_approx": med["asmk_e2e"] / med["ours_e2e_approx"],
        "e2e_exact_top": med["asmk_e2e_top"] / med["ours_e2e_exact_top"],
        "e2e_approx_top": med["asmk_e2e_top"] / med["ours_e2e_approx_top"],
        "quantise_exact": med["asmk_quantise"] / med["ours_quantise_exact"],
        "quantise_approx": med["asmk_quantise"] / med["ours_quantise_approx"],
        "aggregate": med["asmk_aggregate"] / med["ours_aggregate"],
        "search": med["asmk_search"] / med["ours_search"],
        "after_quantisation": (med["asmk_aggregate"] + med["asmk_search"])
        / (med["ours_aggregate"] + med["ours_search"])}
    return {"data": "real-shape words (RealMaps), random features" if a.real_maps
            else "Zipf words, random features", "n_images": n, "dim": dim, "bits": dim,
            "noise": a.noise, "ma": ma, "alpha": a.alpha, "tau": a.tau, "top": top,
            "build_cpu_s": {"asmk": t_asmk, "ours": t_ours}, "postings": int(docs.size),
            "approx_candidates": cb.n_candidates, "approx_agreement": agreement,
            "check": check, "timings_ms": tm, "speedups": speedups}


def report_vs_asmk(r: dict[str, Any]) -> None:
    t, s = r["timings_ms"], r["speedups"]
    print(f"\n{r['n_images']} images, {r['dim']}-D random features, MA {r['ma']} "
          f"({r['check']['ma1_words']:.0f} nearest words -> {r['check']['ma_words']:.0f} MA "
          f"words per box query, {r['check']['postings_touched']:.0f} postings touched)")
    print("| per box query, CPU ms (p95) | asmk 0.1.1 | ours, exact MA | ours, approximate MA |")
    print("|---|---|---|---|")

    def c(name: str) -> str:
        return f"{t[name]['median_ms']:.2f} ({t[name]['p95_ms']:.2f})"

    print(f"| quantise (MA {r['ma']}) | {c('asmk_quantise')} | {c('ours_quantise_exact')} | "
          f"{c('ours_quantise_approx')} |")
    print(f"| aggregate | {c('asmk_aggregate')} | {c('ours_aggregate')} | same |")
    print(f"| search + full ranking | {c('asmk_search')} | {c('ours_search')} | same |")
    print(f"| end to end, full ranking | {c('asmk_e2e')} | {c('ours_e2e_exact')} | "
          f"{c('ours_e2e_approx')} |")
    print(f"| end to end, top-{r['top']} | {c('asmk_e2e_top')} | {c('ours_e2e_exact_top')} | "
          f"{c('ours_e2e_approx_top')} |")
    print(f"speed-up (asmk / ours): end to end {s['e2e_exact']:.1f}x exact, "
          f"{s['e2e_approx']:.1f}x approximate (top-{r['top']}: {s['e2e_exact_top']:.1f}x, "
          f"{s['e2e_approx_top']:.1f}x); aggregate {s['aggregate']:.1f}x, search "
          f"{s['search']:.1f}x, after quantisation {s['after_quantisation']:.1f}x")


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=105_000, help="database images")
    ap.add_argument("--vs-asmk", action="store_true",
                    help="mode 2: end to end against the asmk package (small --n only)")
    ap.add_argument("--real-maps", type=Path, default=None,
                    help="a step-C assignment store of 42x32 maps (bench_inverted_file's "
                    "real-shape model); default: the Zipf model")
    ap.add_argument("--features", type=Path, default=None,
                    help="mode 1, real-shape: the run's feature store (default: the only "
                    "one in <run>/features)")
    ap.add_argument("--models", type=Path, default=None,
                    help="mode 1, real-shape: pca.npz + codebook.npy (default <run>/models)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="mode 1: where the indexes are built and kept (reused when they "
                    "match); default: a temporary folder, removed")
    ap.add_argument("--queries", type=int, default=20, help="queries per kind")
    ap.add_argument("--reps", type=int, default=5, help="timed blocks per contender")
    ap.add_argument("--bits", type=int, default=128, help="mode 1: signature bits")
    ap.add_argument("--ma", type=int, default=DEFAULT_QUERY_MA,
                    help="query multiple assignment")
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    ap.add_argument("--tau", type=float, default=DEFAULT_TAU)
    ap.add_argument("--dim", type=int, default=128,
                    help="dimension of the random features and codebook (mode 2, and "
                    "mode 1's Zipf query model); mode 2's signatures have as many bits")
    ap.add_argument("--noise", type=float, default=0.005,
                    help="random features: per-dimension noise around the centroid")
    ap.add_argument("--top", type=int, default=100, help="mode 2: the top-k regime's k")
    ap.add_argument("--loop-variants", nargs="*", default=[], metavar="DEFINES",
                    help="mode 1: also time the compiled loop built with these -D "
                    "definitions, in the same rotation (e.g. PREFETCH_BYTES=0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None,
                    help="results file (default benchmarks/results/asmk_scoring_<...>.json)")
    a = ap.parse_args(argv)
    if a.vs_asmk and a.n > 110_000:
        raise SystemExit(f"--vs-asmk with --n {a.n}: asmk's build is a per-descriptor Python "
                         "loop (minutes at 105k); use at most 110,000")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    faiss.omp_set_num_threads(1)
    retain_freed_memory()  # as the pipeline scripts do (lib/allocator.py)
    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()
    args = sys.argv[1:] if argv is None else argv
    cmd = (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} .venv/bin/python "
           f"benchmarks/bench_asmk_scoring.py {shlex.join(args)}")
    if a.vs_asmk:
        r = run_vs_asmk(a)
        report_vs_asmk(r)
        data = "real" if a.real_maps else "zipf"
        default = RESULTS / f"asmk_scoring_vs_asmk_{data}_{a.n}.json"
    else:
        r = run_scoring(a)
        report_scoring(r)
        size = f"{a.n // 1000}k" if a.n < 1_000_000 else f"{a.n / 1e6:g}m"
        default = RESULTS / f"asmk_scoring_{'real' if a.real_maps else 'zipf'}_{size}.json"
    try:
        asmk_version: str | None = metadata.version("asmk")
    except metadata.PackageNotFoundError:  # optional package
        asmk_version = None
    out = {"benchmark": "bench_asmk_scoring", "mode": "vs_asmk" if a.vs_asmk else "scoring",
           "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": MACHINE,
           "command": cmd, "load_average_start": load0, "load_average_end": os.getloadavg(),
           "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started
                             ).total_seconds(), 1),
           "versions": {**library_versions(), "scipy": scipy.__version__,
                        "asmk": asmk_version},
           "protocol": "CPU time (time.process_time) per query, one thread; "
                       "bench_inverted_file.time_blocks: contenders alternate in blocks of "
                       f"all {a.queries} queries, {a.reps} timed blocks each after a warm-up "
                       "pass; median_ms = time_blocks' median; p95_ms over all timed calls; "
                       "query_median_p95_ms = p95 over queries of each query's median",
           **r}
    path = a.json or default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
