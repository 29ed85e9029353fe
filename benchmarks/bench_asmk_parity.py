"""Parity of lib/index/asmk.py with the reference ASMK (PyPI asmk 0.1.1, binary, no idf)
on real local features: the same scores for every query, up to float rounding.

Optional: the oracle needs ``.venv/bin/pip install asmk==0.1.1`` (not a project
dependency); without it the script says so and exits 0.

Data: a feature store of step A (``--store``) and the models of step B (``--models``:
pca.npz + codebook.npy). Every stored image is read as step C reads it (maps upsampled to
``--new-dim``, L2 -> PCA-whitening -> L2) and indexed by both systems from the same
features: ours with :func:`lib.index.asmk.query_words` (k = 1), :func:`aggregate` and
:func:`build_postings`; asmk with its own ``Codebook`` (``initialize_from_state`` with our
centroids: a faiss ``IndexFlatL2``), ``ASMKKernel(binary=True)`` and ``IVF`` (each
system quantises by itself). Queries: the features inside a random box (a third to
four fifths of each side; seeded) of ``--queries`` database images spread over the store
(``--full``: whole images), quantised with ``--ma`` nearest words by each system.
``--n-bits`` below D: ours keeps the first n_bits residual dimensions; asmk gets the
same words (quantised on all D) and features and centroids cut to n_bits.

Reported per query, then summarised: whether both found the same words, how many
aggregated signatures are bit-identical (database side: all images), the largest
absolute score difference, and the agreement of the top ``--top`` images (both score
arrays ranked with the project's tie rule, lib.search.rankings.rank_scores: same images
as a set, same images at the same ranks). CPU times per query, end to end (quantisation,
aggregation, scores, full ranking), are measured on the same real queries for asmk, for
ours with the same exact multiple assignment, and for ours with the approximate one that
step D uses with ``assignment = approximate`` (``Codebook.nearest``, its shortlist tuned
on database features as step C tunes it); the approximate words are compared with the
exact ones (share of each feature's k words found, Jaccard of the query's word sets) and
its top ``--top`` with asmk's. Each query is timed once per system, the systems one
after the other, so a slow phase of a shared machine hits them alike; medians are
reported.

    .venv/bin/python benchmarks/bench_asmk_parity.py --store RUN/features/X.lmdb \\
        --models RUN/models [--new-dim 42 32] [--ma 5] [--n-bits 128]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_query_quantisers import word_agreement
from benchmarks.bench_vs_asmk import _asmk
from lib.features.feature_store import FeatureStore
from lib.features.local_features import LocalFeatureReader
from lib.index.asmk import (
    aggregate,
    build_postings,
    doc_weights,
    query_words,
    score_postings,
    to_asmk_packed,
)
from lib.search.rankings import rank_scores
from lib.vocabulary.codebook import Codebook
from lib.vocabulary.pca import PCAWhitening


def _box(n_h: int, n_w: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices (row-major cells) of a random box covering 1/3 to 4/5 of each side."""
    bh = int(rng.integers(max(1, n_h // 3), max(2, 4 * n_h // 5) + 1))
    bw = int(rng.integers(max(1, n_w // 3), max(2, 4 * n_w // 5) + 1))
    r0 = int(rng.integers(0, n_h - bh + 1))
    c0 = int(rng.integers(0, n_w - bw + 1))
    rr, cc = np.meshgrid(np.arange(r0, r0 + bh), np.arange(c0, c0 + bw), indexing="ij")
    return (rr * n_w + cc).ravel()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="feature store (LMDB, step A)")
    ap.add_argument("--models", type=Path, required=True,
                    help="folder with pca.npz and codebook.npy (step B)")
    ap.add_argument("--new-dim", type=int, nargs=2, default=[42, 32],
                    help="portrait H W the maps are upsampled to, as in the run's settings")
    ap.add_argument("--layers", nargs="*", default=None, help="stored layers (default all)")
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--full", action="store_true", help="whole images as queries")
    ap.add_argument("--ma", type=int, default=5, help="query multiple assignment")
    ap.add_argument("--alpha", type=float, default=3.0)
    ap.add_argument("--tau", type=float, default=0.0)
    ap.add_argument("--n-bits", type=int, default=None, help="default: the PCA dimension")
    ap.add_argument("--top", type=int, default=100)
    ap.add_argument("--max-images", type=int, default=None, help="index the first N only")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    acodebook, _, aindex, ainverted_file, akernel = _asmk()

    pca = PCAWhitening.load(a.models / "pca.npz")
    cb = Codebook.load(a.models / "codebook.npy")
    cent = cb.centroids
    n_bits = a.n_bits or cb.dim
    store = FeatureStore(a.store)
    reader = LocalFeatureReader(store, a.new_dim, l2norm=True, pca=pca, layers=a.layers)
    ids = store.ids()[:a.max_images]
    n_docs = len(ids)

    def asmk_codebook(c: np.ndarray) -> object:  # asmk.codebook.Codebook
        return acodebook.Codebook.initialize_from_state(
            {"type": "Codebook", "params": {"size": int(c.shape[0])},
             "state": {"centroids": np.ascontiguousarray(c)}},
            index_factory=aindex.initialize_index(None))

    acdb = asmk_codebook(cent)  # quantises on all D
    kern = akernel.ASMKKernel(asmk_codebook(cent[:, :n_bits]), binary=True)
    aivf = ainverted_file.IVF.initialize_empty(codebook_size=cb.k, use_idf=False)
    print(f"{n_docs} images of {a.store}, {cb.dim}-D features, {cb.k} words, {n_bits} bits, "
          f"query MA {a.ma}, alpha {a.alpha}, tau {a.tau}", flush=True)

    images, feats, shapes = [], [], []
    sig_same = sig_all = word_diff = 0
    t0 = time.perf_counter()
    for i, image_id in enumerate(ids):
        x, hw = reader.features_and_shape(image_id)
        feats.append(x)
        shapes.append(hw)
        w = query_words(cb, x, 1)
        images.append(aggregate(x, w[:, 0], cent, n_bits))
        _, aw = acdb.quantize(x, multiple_assignment=1)
        word_diff += int(np.sum(aw != w))
        ades, aids = kern.aggregate_image(np.ascontiguousarray(x[:, :n_bits]), aw)
        if aids.size:
            aivf.add(ades, aids.astype(np.int64), np.full(aids.size, i, np.int64))
        if np.array_equal(aids, images[-1][0]):
            sig_same += int(np.sum(np.all(ades == to_asmk_packed(images[-1][1]), axis=1)))
        sig_all += aids.size
    offsets, docs, sigs, _ = build_postings(images, cb.k)
    dw = doc_weights(docs, n_docs)
    print(f"indexed in {time.perf_counter() - t0:.1f} s: {docs.size} postings; database "
          f"words differing {word_diff}; signatures identical {sig_same} of {sig_all}",
          flush=True)

    cba = Codebook(cent, "approximate")  # step D's approximate MA, tuned like step C
    sample = np.concatenate(feats)
    sample = sample[np.random.default_rng(a.seed).permutation(len(sample))[:10000]]
    agreement = cba.tune(sample)
    print(f"approximate assignment: {cba.n_candidates} candidates, agreement with exact "
          f"{agreement:.4f} (nearest word)", flush=True)
    rng = np.random.default_rng(a.seed)
    picks = np.linspace(0, n_docs - 1, min(a.queries, n_docs)).round().astype(int)
    sim = {"alpha": a.alpha, "similarity_threshold": a.tau}
    rows = []
    for qi in picks:
        x = feats[qi] if a.full else feats[qi][_box(*shapes[qi], rng)]
        t = time.process_time()
        qw = query_words(cb, x, a.ma)
        uw, qs = aggregate(x, qw, cent, n_bits)
        ours = score_postings(uw, qs, offsets, docs, sigs, dw, n_docs, alpha=a.alpha,
                              tau=a.tau, n_bits=n_bits, per_doc=True)
        rank_scores(ours)
        t_ours = time.process_time() - t
        t = time.process_time()
        qwa = cba.nearest(x, a.ma)
        uwa, qsa = aggregate(x, qwa, cent, n_bits)
        approx = score_postings(uwa, qsa, offsets, docs, sigs, dw, n_docs, alpha=a.alpha,
                                tau=a.tau, n_bits=n_bits, per_doc=True)
        top_a = rank_scores(approx)[:a.top]
        t_approx = time.process_time() - t
        t = time.process_time()
        _, aw = acdb.quantize(x, multiple_assignment=a.ma)
        ades, aids = kern.aggregate_image(np.ascontiguousarray(x[:, :n_bits]), aw)
        ranks, sc = aivf.search(ades, aids.astype(np.int64), topk=None,
                                similarity_func=lambda *v: kern.similarity(*v, **sim))
        t_asmk = time.process_time() - t
        ref = np.zeros(n_docs)
        ref[ranks] = sc
        q_same = int(np.sum(np.all(ades == to_asmk_packed(qs), axis=1))) \
            if np.array_equal(aids, uw) else 0
        top_o, top_r = rank_scores(ours)[:a.top], rank_scores(ref.astype(np.float32))[:a.top]
        rows.append({
            "words_same": bool(np.array_equal(aw, qw)), "sigs_same": q_same,
            "n_words": int(uw.size), "max_abs": float(np.abs(ours - ref).max()),
            "max_score": float(ref.max()),
            "overlap": len(set(top_o.tolist()) & set(top_r.tolist())) / top_o.size,
            "same_rank": float(np.mean(top_o == top_r)), "ms_ours": 1e3 * t_ours,
            "ms_asmk": 1e3 * t_asmk, "ms_approx": 1e3 * t_approx,
            **dict(zip(("approx_pairs", "approx_jaccard"), word_agreement(qwa, qw))),
            "approx_overlap": len(set(top_a.tolist()) & set(top_r.tolist())) / top_a.size})
        r = rows[-1]
        print(f"query {qi:4d} ({x.shape[0]} features, {r['n_words']} words): words same "
              f"{r['words_same']}, signatures same {r['sigs_same']}/{r['n_words']}, max |diff| "
              f"{r['max_abs']:.2e} (top score {r['max_score']:.4f}), top-{a.top} overlap "
              f"{r['overlap']:.2f}, same rank {r['same_rank']:.2f}; CPU {r['ms_ours']:.1f} "
              f"ms ours, {r['ms_asmk']:.1f} ms asmk, {r['ms_approx']:.1f} ms ours approximate MA "
              f"(words: {r['approx_pairs']:.3f} of the k, Jaccard {r['approx_jaccard']:.3f}; "
              f"top-{a.top} overlap with asmk {r['approx_overlap']:.2f})", flush=True)
    n = len(rows)
    print(f"\nsummary over {n} queries: words same in {sum(r['words_same'] for r in rows)}; "
          f"query signatures identical {sum(r['sigs_same'] for r in rows)} of "
          f"{sum(r['n_words'] for r in rows)}; max |score diff| "
          f"{max(r['max_abs'] for r in rows):.3e}; top-{a.top} overlap min "
          f"{min(r['overlap'] for r in rows):.3f} mean {np.mean([r['overlap'] for r in rows]):.3f}"
          f"; same rank min {min(r['same_rank'] for r in rows):.3f} mean "
          f"{np.mean([r['same_rank'] for r in rows]):.3f}; median CPU per query "
          f"{np.median([r['ms_ours'] for r in rows]):.1f} ms ours, "
          f"{np.median([r['ms_asmk'] for r in rows]):.1f} ms asmk")
    med = {k: float(np.median([r[k] for r in rows])) for k in ("ms_ours", "ms_asmk", "ms_approx")}
    print(f"end to end, median CPU ms per query: asmk {med['ms_asmk']:.1f}, ours exact MA "
          f"{med['ms_ours']:.1f} ({med['ms_asmk'] / med['ms_ours']:.1f}x), ours approximate "
          f"MA {med['ms_approx']:.1f} ({med['ms_asmk'] / med['ms_approx']:.1f}x); approximate "
          f"words: {np.mean([r['approx_pairs'] for r in rows]):.3f} of the k, Jaccard "
          f"{np.mean([r['approx_jaccard'] for r in rows]):.3f}; top-{a.top} overlap with asmk "
          f"{np.mean([r['approx_overlap'] for r in rows]):.3f}")


if __name__ == "__main__":
    main()
