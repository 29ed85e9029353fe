#!/usr/bin/env python
"""Spatial re-ranking with several ``scales``: windows at scale 1 only (what step D does)
against windows scored at every scale, on a finished run with several scales whose
queries are database images without a box (the SMVS protocol).

The first stage is the run's own ``bow/scores.npy`` (the scales' combined vectors). For
the top ``top`` of each query, every scale's candidate word maps (step C's assignment
stores) are scored against the query's map at that scale (the query image's own stored
map: a whole-image query is encoded as its database copy) by
:func:`lib.search.rerank.rerank`, with the run's re-ranking settings, each scale choosing
its best window. The window score is then scale 1's (the pipeline) or the scales'
scores weighted by the scale squared and divided by the weights' sum (the weights of the
combined vectors). The fused ranking (``rerank_score = fused``) is formed as step D forms
it (:func:`lib.search.rerank.fuse`, :func:`lib.search.searcher.ranking_scores`) for
several ``rerank_fusion_weight`` values, then evaluated by step E's code. Reported:
mAP and the paired difference to the first stage with a bootstrap 95 % interval.

    .venv/bin/python benchmarks/bench_rerank_scales.py SETTINGS --run RUN [--set k=v]
"""

from __future__ import annotations

import json

import numpy as np
from tqdm import tqdm

from benchmarks.finished_run import aps, arguments, paired, run_settings
from lib.evaluation.metrics import evaluate
from lib.features.scales import assignment_path, extra_scales
from lib.groundtruth.loader import load_ground_truth
from lib.index.assignment_store import AssignmentStore
from lib.search.rankings import Rankings, rank_scores
from lib.search.rerank import fuse, rerank
from lib.search.searcher import ranking_scores

WEIGHTS = (0.05, 0.15, 0.25, 0.5)


def main() -> None:
    a = arguments(__doc__, "finished run folder (A-E)").parse_args()
    s = run_settings(a)
    gt = load_ground_truth(s)
    ids = list(gt.db_ids)
    listed = (a.run / "bow" / "queries.txt").read_text().splitlines()
    first = np.load(a.run / "bow" / "scores.npy")
    scales = [1.0, *extra_scales(s)]
    stores = [AssignmentStore(a.run / "assignments.lmdb"),
              *[AssignmentStore(assignment_path(s, sc)) for sc in scales[1:]]]
    n_words = int(s.n_centers)
    weights = np.array([sc * sc for sc in scales])
    coarse = s.rerank_global == "coarse"
    kw = {"ar_threshold": float(s.ar_threshold), "levels": 1 if coarse else
          int(s.pyramid_levels), "window_set": "large" if coarse else "all",
          "weighting": "centre_prior" if s.rerank_weighting == "database"
          and s.weighting == "centre_prior" else "counts"}
    top_n = int(s.top)
    by_name = {q.name: q for q in gt.queries}
    per_scale: dict[str, np.ndarray] = {}  # query -> (n_scales, top) best-window scores
    tops: dict[str, np.ndarray] = {}
    for qi, name in enumerate(tqdm(listed, desc="windows", unit="query")):
        q = by_name[name]
        sc_row = first[qi]
        top = rank_scores(sc_row)[:top_n]
        tops[name] = top
        rows = []
        for st in stores:
            qmap = st.get(q.image)[0]
            maps = [st.get(ids[i])[0] for i in top]
            rows.append(rerank(qmap, None, maps, n_words, **kw).scores)
        per_scale[name] = np.stack(rows)

    def run(window_of: str, weight: float | None) -> np.ndarray:
        orders = {}
        for qi, name in enumerate(listed):
            sc_row, top = first[qi], tops[name]
            if weight is None:
                orders[name] = rank_scores(sc_row)
                continue
            ws = per_scale[name]
            win = ws[0] if window_of == "scale 1" else (weights @ ws) / weights.sum()
            order_by = fuse(sc_row[top], win, weight)
            orders[name] = rank_scores(ranking_scores(sc_row, top, order_by))
        return aps(evaluate(gt, Rankings(listed, {}, {}, indices=orders)), listed)

    base = run("", None)
    print(f"{len(listed)} queries, scales {scales}, top {top_n}, {kw}; first stage "
          f"{base.mean():.4f}", flush=True)
    rows = [{"variant": "first stage", "map": float(base.mean())}]
    print("| windows | fusion weight | mAP | vs first stage [95 %], up/down |")
    print("|---|---|---|---|")
    for window_of in ("scale 1", "all scales, s^2-weighted"):
        for w in WEIGHTS:
            ap_ = run(window_of, w)
            print(f"| {window_of} | {w} | {ap_.mean():.4f} | {paired(ap_, base)} |", flush=True)
            rows.append({"windows": window_of, "weight": w, "map": float(ap_.mean()),
                         "vs_first": paired(ap_, base)})
    if a.json:
        a.json.write_text(json.dumps({"settings": str(a.settings), "set": a.set,
                                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
