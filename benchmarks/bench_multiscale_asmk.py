#!/usr/bin/env python
"""Multi-scale extraction with the ASMK kernel: a measurement on a finished run whose
settings have several ``scales`` (issue 20, point 5: HOW aggregates its local features
over scales), first stage only.

The pipeline refuses ``kernel = asmk`` with several scales; this measures what it would
give before building it. From the run's stores (read only): every database image's kept
cells at every scale (step C's word maps, ``keep_cells`` applied, and the features
they came from) are pooled, and the residuals of the pooled features are summed per
word and binarised (:func:`lib.index.asmk.aggregate`), so one signature per word covers
all scales, as HOW does. The whole-image queries (database images, as in the SMVS
protocol) pool their kept cells the same way, each feature assigned to its ``query_ma``
nearest words (the run's tuned approximate search, as step D). Scored with
:func:`lib.index.asmk.score_postings`, ranked with the project's tie rule and evaluated
by step E's code.

Word weights: ``uniform`` (the reference, 1/sqrt of the image's words) or ``bow``
(``asmk_weighting = bow``): the database image's word weight in its BoW vector (one
scale) or in the scales' combined vector (``lib.features.scales.image_vector``); the
query's as step D weighs a whole-image query (the cells with a positive centre prior,
each word the sum of its features' centre prior, L2-normalised), combined over scales
the same way (weighted by the scale squared, summed, L2-normalised). With σ ≡ 1 and one
word per feature the ``bow`` rows are BoW (a check row).

    .venv/bin/python benchmarks/bench_multiscale_asmk.py SETTINGS --run RUN [--set k=v]
"""

from __future__ import annotations

import json
import time

import numpy as np
from tqdm import tqdm

from benchmarks.finished_run import aps, arguments, paired, run_settings
from lib.evaluation.metrics import evaluate
from lib.features.feature_store import FeatureStore
from lib.features.local_features import LocalFeatureReader
from lib.features.scales import (
    assignment_path,
    at_scale,
    combine,
    extra_scales,
    image_vector,
)
from lib.groundtruth.loader import load_ground_truth
from lib.index.asmk import aggregate, build_postings, score_postings
from lib.index.assignment_store import AssignmentStore
from lib.index.bow import centre_prior, l2_normalise
from lib.index.encoding import weights_of_words
from lib.provenance import asmk_bits, load_models
from lib.search.rankings import Rankings, rank_scores

# (name, sigma, alpha, tau, query_ma, weighting)
VARIANTS = [
    ("sigma 1, MA 1, bow weights (BoW)", "shifted", 0.0, -1.0, 1, "bow"),
    ("reference: asmk, alpha 3, tau 0, MA 5, uniform", "asmk", 3.0, 0.0, 5, "uniform"),
    ("shifted, alpha 0.25, tau -1, MA 2, bow weights", "shifted", 0.25, -1.0, 2, "bow"),
    ("sigma 1, MA 2, bow weights", "shifted", 0.0, -1.0, 2, "bow"),
]


def mass_vector(words: np.ndarray, cell_w: np.ndarray, n_words: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """A query's word weights as step D's weighted kernel has them: each feature's cell
    weight summed over its words, L2-normalised."""
    c = np.bincount(words.ravel(), np.repeat(cell_w, words.shape[1]), minlength=n_words)
    idx = np.flatnonzero(c)
    return l2_normalise((idx, c[idx].astype(np.float32)))


def main() -> None:
    a = arguments(__doc__, "finished run folder (A-C)").parse_args()
    s = run_settings(a)
    pca, cb = load_models(s)
    asg1 = AssignmentStore(a.run / "assignments.lmdb")
    if "n_candidates" in asg1.meta:
        cb.n_candidates = int(asg1.meta["n_candidates"])
    scales = [1.0, *extra_scales(s)]
    stores, readers = [asg1], []
    for sc in scales:
        ss = at_scale(s, sc) if sc != 1.0 else s
        if sc != 1.0:
            stores.append(AssignmentStore(assignment_path(s, sc)))
        readers.append(LocalFeatureReader(FeatureStore(FeatureStore.path_for(ss)),
                                          list(ss.new_dim) if ss.new_dim else None,
                                          l2norm=ss.l2norm, pca=pca))
    gt = load_ground_truth(s)
    ids = list(gt.db_ids)
    k, cent, bits = cb.k, cb.centroids, asmk_bits(s, cb.dim)
    print(f"{len(ids)} images, scales {scales}, {k} words, {bits} bits, keep_cells "
          f"{s.keep_cells}, approximate MA with {cb.n_candidates} candidates", flush=True)

    # kept cells per image and scale: (features, stored words, centre prior)
    kept: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for i in tqdm(ids, desc="reading", unit="img"):
        per = []
        for st, rd in zip(stores, readers):
            if i not in st:
                continue
            feats = np.asarray(rd.features_and_shape(i)[0], np.float32)
            wmap = st.get(i)[0]
            wm = wmap.ravel().astype(np.int64)
            m = wm != k
            per.append((feats[m], wm[m], centre_prior(*wmap.shape).ravel()[m]))
        kept[i] = per
    q_names = [q.name for q in gt.queries]
    q_words: dict[int, dict[str, list[np.ndarray]]] = {}
    for ma in sorted({v[4] for v in VARIANTS}):
        t = time.perf_counter()
        q_words[ma] = {q: [cb.nearest(f, ma) if ma > 1 else w[:, None] for f, w, _ in kept[q]]
                       for q in q_names}
        print(f"query words, MA {ma}: {time.perf_counter() - t:.0f} s", flush=True)

    rows = []
    for n_scales in (1, len(scales)):
        use = slice(0, n_scales)
        images = [aggregate(np.concatenate([f for f, _, _ in kept[i][use]]),
                            np.concatenate([w for _, w, _ in kept[i][use]]), cent, bits)
                  for i in tqdm(ids, desc=f"aggregating, {n_scales} scale(s)", unit="img")]
        offsets, docs, sigs, uniform = build_postings(images, k)
        vecs = [image_vector(i, asg1, list(zip(scales[1:n_scales], stores[1:n_scales])),
                             s.weighting, k) for i in ids]
        bow_w = np.zeros(docs.size, np.float32)
        for d, (uw, _) in enumerate(images):  # each posting's BoW weight
            pos = offsets[uw] + np.array([np.searchsorted(docs[offsets[w]:offsets[w + 1]], d)
                                          for w in uw], np.int64)
            bow_w[pos] = weights_of_words(vecs[d], uw)
        for name, sigma, alpha, tau, ma, weighting in VARIANTS:
            orders = {}
            for q in q_names:
                per = q_words[ma][q][use]
                cells = kept[q][use]
                qwt = None
                if weighting == "uniform":  # the reference: every kept cell
                    feats = np.concatenate([f for f, _, _ in cells])
                    words = np.concatenate(per)
                    uw, qs = aggregate(feats, words, cent, bits)
                else:  # step D's weighted kernel: the cells with a positive centre prior
                    pos = [c[2] > 0 for c in cells]
                    feats = np.concatenate([c[0][p] for c, p in zip(cells, pos)])
                    words = np.concatenate([w[p] for w, p in zip(per, pos)])
                    uw, qs = aggregate(feats, words, cent, bits)
                    masses = [mass_vector(w[p], c[2][p], k) for w, c, p in zip(per, cells, pos)]
                    qwt = weights_of_words(combine(masses, scales[:n_scales]), uw)
                sc = score_postings(uw, qs, offsets, docs, sigs,
                                    bow_w if weighting == "bow" else uniform, len(ids),
                                    alpha, tau, bits, per_doc=False, query_weights=qwt,
                                    sigma=sigma)
                orders[q] = rank_scores(sc)
            res = evaluate(gt, Rankings(q_names, {}, {}, indices=orders))
            rows.append({"scales": scales[:n_scales], "variant": name, "map": res["map"],
                         "per_query": res["per_query"]})
            print(f"| {n_scales} | {name} | {res['map']:.4f} |", flush=True)
    # paired differences: each kernel's scales against its one scale, and every row
    # against BoW with all the scales (the first variant is BoW)
    by = {(len(r["scales"]), r["variant"]): aps(r, q_names) for r in rows}
    bow_all = by[(len(scales), VARIANTS[0][0])]
    print(f"\n| variant | {len(scales)} scales vs 1 | 1 scale vs BoW at {len(scales)} | "
          f"{len(scales)} scales vs BoW at {len(scales)} |")
    print("|---|---|---|---|")
    for name, *_ in VARIANTS:
        one, many = by[(1, name)], by[(len(scales), name)]
        print(f"| {name} | {paired(many, one)} | {paired(one, bow_all)} | "
              f"{paired(many, bow_all)} |")
    if a.json:
        a.json.write_text(json.dumps({"settings": str(a.settings), "set": a.set,
                                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
