"""What the paper's second stage loses, and the fix: re-ranking and query expansion on a
finished run, with the measurements that explain the difference (issue 20, point 4).

For each search (GS = masking 0, LS = masking 1) every query is encoded once and ranked
by :class:`lib.search.searcher.BowSearcher` (step D's own code) under these settings:

* ``first stage``: rerank false, query_expansion none;
* ``paper R`` / ``paper GQE`` / ``paper R+GQE`` / ``paper R+LQE``: the paper's rule,
  ``rerank_weighting = counts``, ``rerank_global = paper``, ``qe_select = top`` (the top
  ``qe_top`` = 10);
* ``R`` / ``GQE`` / ``R+GQE`` / ``R+LQE``: the defaults, ``rerank_weighting = database``
  (windows and query box weighted like the database vectors: the centre prior),
  ``rerank_global = coarse`` (without a box: the 7 large windows, one level) and
  ``qe_select = verified`` (``qe_verify`` = 0.8).

The mAP is the Oxford-rule AP of step E (junk ignored) over the full ranking. Then the
diagnostics, all on the first stage's top ``top`` (100):

* **weighting x windows**: the best-window score with counts or centre-prior weights on
  the query side and on the candidate side (2 x 2), over all windows (the paper's 121)
  and over the full map only (no windows), both with the paper's two-level pyramid; and
  the full map with one level, which with centre-prior candidates is the first search
  itself (counts query, GS) or the first search with a centre-prior query; and the
  weighted windows with one level, the 7 large windows, and both (R without a box);
* **fusion**: ``first score + beta * paper window score`` for a few beta;
* **per query**: positives in the top 10 (junk ignored) before and after re-ranking, how
  many leave it and enter it, the negatives entering it and the area of their best
  window, the pairwise AUC of positives against negatives inside the top ``top`` and the
  mean scores of positives and negatives;
* **expansion sets**: how many images query expansion averages per query, and how many
  of them are positives / junk (for SMVS the junk is the query photo itself, which is
  also a database image), for the paper's top 10 and for the verified set.

Nothing is written to the run: the script works in a scratch folder (``--scratch``)
whose ``assignments.lmdb``, ``index``, ``models`` and ``features`` are links to the run
and whose query cache is a copy of the run's. Results go to
``benchmarks/results/rerank_fusion_<dataset>.json``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rerank_fusion.py settings/demo.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rerank_fusion.py settings/smvs_dvd.json
    # another ground truth on a run holding its database (benchmarks/README.md):
    ... bench_rerank_fusion.py settings/smvs_dvd.json --run DIR --set path_gt=REF.json \
        --out benchmarks/results/rerank_fusion_smvs_dvd_ref.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lib.evaluation.metrics import ap_from_ranks, junk_free_ranks
from lib.groundtruth.loader import load_ground_truth
from lib.index.assignment_store import AssignmentStore
from lib.index.inverted_file import InvertedFile
from lib.search import rerank as rr
from lib.search.query_encoding import CACHE_NAME, QueryEncoder
from lib.search.searcher import BowSearcher
from lib.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
PAPER = {"rerank_weighting": "counts", "rerank_global": "paper", "qe_select": "top"}
NEW = {"rerank_weighting": "database", "rerank_global": "coarse", "qe_select": "verified"}
VARIANTS: dict[str, dict[str, Any]] = {  # name: settings changes
    "first stage": {"rerank": False, "query_expansion": "none"},
    "paper R": {"rerank": True, "query_expansion": "none", **PAPER},
    "paper GQE": {"rerank": False, "query_expansion": "gqe", **PAPER},
    "paper R+GQE": {"rerank": True, "query_expansion": "gqe", **PAPER},
    "paper R+LQE": {"rerank": True, "query_expansion": "lqe", **PAPER},
    "R": {"rerank": True, "query_expansion": "none", **NEW},
    "GQE": {"rerank": False, "query_expansion": "gqe", **NEW},
    "R+GQE": {"rerank": True, "query_expansion": "gqe", **NEW},
    "R+LQE": {"rerank": True, "query_expansion": "lqe", **NEW},
}
SEARCH = {0: "GS", 1: "LS"}
BETAS = (0.25, 1.0, 4.0)
WEIGHT = {"c": "counts", "p": "centre_prior"}


def scratch_run(run: Path, scratch: Path) -> Path:
    """A folder that reads the run's artefacts through links and owns a copy of its
    query cache, so encoding the queries never writes into the run."""
    scratch.mkdir(parents=True, exist_ok=True)
    for name in ("assignments.lmdb", "index", "models", "features"):
        dst = scratch / name
        if (run / name).exists() and not dst.exists():
            dst.symlink_to((run / name).resolve(), target_is_directory=True)
    cache = scratch / CACHE_NAME
    if (run / CACHE_NAME).exists() and not cache.exists():
        shutil.copytree(run / CACHE_NAME, cache)
    return scratch


class Judge:
    """AP of a ranking of index documents for one query (Oxford rule, junk ignored)."""

    def __init__(self, gt: Any, index_ids: list[str]) -> None:
        self.pos_of = {d: i for i, d in enumerate(index_ids)}
        self.n = len(index_ids)
        self.n_db = len(gt.db_ids)

    def masks(self, q: Any) -> tuple[np.ndarray, np.ndarray, int]:
        pm = np.zeros(self.n, bool)
        jm = np.zeros(self.n, bool)
        pm[[self.pos_of[p] for p in q.positives if p in self.pos_of]] = True
        jm[[self.pos_of[p] for p in q.junk if p in self.pos_of]] = True
        return pm, jm, len(q.positives)

    def ap(self, q: Any, order: np.ndarray) -> float:
        pm, jm, n_pos = self.masks(q)
        return ap_from_ranks(junk_free_ranks(order, pm, jm), n_pos) if n_pos else np.nan


def best_windows(eq: Any, maps: list[np.ndarray], n_words: int, q_wt: str, c_wt: str,
                 levels: int, ar_threshold: float, full_only: bool, large: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Best-window score and its area fraction per candidate, with ``q_wt`` weights on
    the query box and ``c_wt`` on the candidates (the library ties both to one
    weighting; the mixed cases separate the two sides). ``full_only``: the full map."""
    qd, qn, ar_q = rr._query_side(eq.words[0], eq.cells, n_words, levels, q_wt)
    score = np.zeros(len(maps))
    area = np.ones(len(maps))
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(maps):
        by_shape.setdefault(m.shape, []).append(i)
    for (h, w), ids in by_shape.items():
        en, n = rr._prepare(np.stack([maps[i] for i in ids]), c_wt)
        s = rr._all_scores(en, n, qd, qn, levels)
        cw = rr._cell_windows(h, w)
        keep = np.zeros(len(cw), bool) if full_only else rr.ar_mask(cw, ar_q, ar_threshold)
        if large:
            keep &= rr._LARGE
        if not keep.any():
            keep[0] = True
        s = np.where(keep[None, :], s, -np.inf)
        best = np.argmax(s, axis=1)
        score[ids] = s[np.arange(n), best]
        a = cw[best]
        area[ids] = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) / (h * w)
    return score, area


def top10_moves(order_before: np.ndarray, order_after: np.ndarray, pm: np.ndarray,
                jm: np.ndarray) -> tuple[int, int, int, list[int]]:
    """Positives in the junk-free top 10 before, positives leaving / entering it, and the
    negatives entering it (their document ids)."""
    def top10(o: np.ndarray) -> set[int]:
        return set(o[~jm[o]][:10].tolist())
    b, a = top10(order_before), top10(order_after)
    pos_b = {i for i in b if pm[i]}
    pos_a = {i for i in a if pm[i]}
    neg_in = [i for i in a - b if not pm[i]]
    return len(pos_b), len(pos_b - pos_a), len(pos_a - pos_b), neg_in


def auc(score: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float | None:
    p, n = score[pos], score[neg]
    if p.size == 0 or n.size == 0:
        return None
    return float((p[:, None] > n[None, :]).mean() + 0.5 * (p[:, None] == n[None, :]).mean())


def run_search(s: Any, gt: Any, masking: int) -> dict[str, Any]:
    s = s.replace(masking=masking)
    store = AssignmentStore(AssignmentStore.path_for(s))
    enc = QueryEncoder(s, store)
    try:
        index = InvertedFile.load(Path(s["path_output"]) / "index")
        ids = list(index.image_ids)
        judge = Judge(gt, ids)
        K = int(index.n_words)
        T = int(s["top"])
        searchers = {v: BowSearcher(s.replace(**ch), index, store)
                     for v, ch in VARIANTS.items()}
        aps: dict[str, list[float]] = {v: [] for v in VARIANTS}
        ms: dict[str, float] = {v: 0.0 for v in VARIANTS}
        diag_keys = [f"{a}{b}{'_full' if full else ''}" for a in "cp" for b in "cp"
                     for full in (False, True)]
        diag: dict[str, list[float]] = {k: [] for k in diag_keys}
        diag.update({f"fused_{b:g}": [] for b in BETAS})
        diag.update({k: [] for k in ("cp_full_l1", "pp_full_l1", "pp_l1", "pp_large_l2",
                                     "pp_large_l1")})
        per_query: dict[str, Any] = {k: {"pos_top10": 0, "left": 0, "entered": 0,
                                         "neg_entered": 0, "neg_area": [], "auc": [],
                                         "pos_score": [], "neg_score": []}
                                     for k in ("first stage", "paper R", "R")}
        qe_sets: dict[str, dict[str, list[int]]] = {
            k: {"n": [], "pos": [], "junk": []}
            for k in ("paper top 10 (first stage)", "verified (first stage)",
                      "paper top 10 (after paper R)", "verified (after R)")}
        t0 = time.perf_counter()
        for q in gt.queries:
            eq = enc.encode(q)
            pm, jm, n_pos = judge.masks(q)
            if n_pos == 0:
                continue
            for v, srch in searchers.items():
                t1 = time.perf_counter()
                r = srch.rank(eq)
                ms[v] += time.perf_counter() - t1
                aps[v].append(judge.ap(q, r.order))
            # ---- diagnostics on the first stage's top T
            order, sc = index.search(eq.vector)
            top = order[:T]
            maps = [store.get(ids[i])[0] for i in top]
            first = sc[top].astype(np.float64)
            rest = order[T:]
            scored = {}
            for a in "cp":
                for b in "cp":
                    for full in (False, True):
                        key = f"{a}{b}{'_full' if full else ''}"
                        w, area = best_windows(eq, maps, K, WEIGHT[a], WEIGHT[b],
                                               int(s["pyramid_levels"]),
                                               float(s["ar_threshold"]), full)
                        scored[key] = (w, area)
                        perm = np.lexsort((top, -w))
                        diag[key].append(judge.ap(q, np.concatenate([top[perm], rest])))
            for key, a in (("cp_full_l1", "c"), ("pp_full_l1", "p")):
                w, _ = best_windows(eq, maps, K, WEIGHT[a], "centre_prior", 1, 0.0, True)
                perm = np.lexsort((top, -w))
                diag[key].append(judge.ap(q, np.concatenate([top[perm], rest])))
            for key, lev, large in (("pp_l1", 1, False), ("pp_large_l2", 2, True),
                                    ("pp_large_l1", 1, True)):
                w, _ = best_windows(eq, maps, K, "centre_prior", "centre_prior", lev,
                                    float(s["ar_threshold"]), False, large)
                perm = np.lexsort((top, -w))
                diag[key].append(judge.ap(q, np.concatenate([top[perm], rest])))
            paper_w = scored["cc"][0]
            for b in BETAS:
                f = first + b * paper_w
                perm = np.lexsort((top, -f))
                diag[f"fused_{b:g}"].append(judge.ap(q, np.concatenate([top[perm], rest])))
            posm, negm = pm[top] & ~jm[top], ~pm[top] & ~jm[top]
            new_r = scored["pp"] if eq.cells is not None else best_windows(
                eq, maps, K, "centre_prior", "centre_prior", 1, float(s["ar_threshold"]),
                False, True)
            for name, (w, area) in (("first stage", (first, np.ones(T))),
                                    ("paper R", scored["cc"]), ("R", new_r)):
                perm = np.lexsort((top, -w))
                after = np.concatenate([top[perm], rest])
                n_b, left, entered, neg_in = top10_moves(order, after, pm, jm)
                pq = per_query[name]
                pq["pos_top10"] += n_b
                pq["left"] += left
                pq["entered"] += entered
                pq["neg_entered"] += len(neg_in)
                where = {int(d): j for j, d in enumerate(top.tolist())}
                pq["neg_area"] += [float(area[where[d]]) for d in neg_in if d in where]
                a_ = auc(w, posm, negm)
                if a_ is not None:
                    pq["auc"].append(a_)
                pq["pos_score"] += w[posm].tolist()
                pq["neg_score"] += w[negm].tolist()
            # ---- which images query expansion averages
            n_qe = min(int(s["qe_top"]), order.size)
            for name, srch, base in (
                    ("paper top 10 (first stage)", searchers["paper GQE"], None),
                    ("verified (first stage)", searchers["GQE"], None),
                    ("paper top 10 (after paper R)", searchers["paper R+GQE"], "rr"),
                    ("verified (after R)", searchers["R+GQE"], "rr")):
                o, wsc = order, {}
                if base == "rr":
                    o, _, _, _, wsc = srch._rerank(eq, order, sc)
                chosen = srch._expansion_set(eq, o[:n_qe].tolist(), wsc)
                qe_sets[name]["n"].append(len(chosen))
                qe_sets[name]["pos"].append(int(pm[chosen].sum()) if chosen else 0)
                qe_sets[name]["junk"].append(int(jm[chosen].sum()) if chosen else 0)
        n_q = len(aps["first stage"])
        table = {v: float(np.mean(a)) for v, a in aps.items()}
        diagnostics = {k: float(np.mean(v)) for k, v in diag.items()}
        pq_out = {}
        for name, pq in per_query.items():
            pq_out[name] = {
                "positives_in_top10_before": pq["pos_top10"],
                "positives_leaving_top10": pq["left"],
                "positives_entering_top10": pq["entered"],
                "negatives_entering_top10": pq["neg_entered"],
                "mean_window_area_of_negatives_entering": (
                    float(np.mean(pq["neg_area"])) if pq["neg_area"] else None),
                "auc_in_top": float(np.mean(pq["auc"])) if pq["auc"] else None,
                "mean_score_positives": float(np.mean(pq["pos_score"])),
                "mean_score_negatives": float(np.mean(pq["neg_score"])),
            }
        qe_out = {k: {"mean_images": float(np.mean(v["n"])),
                      "mean_positives": float(np.mean(v["pos"])),
                      "mean_junk": float(np.mean(v["junk"])),
                      "queries_not_expanded": int(sum(n == 0 for n in v["n"]))}
                  for k, v in qe_sets.items()}
        return {"search": SEARCH[masking], "n_queries": n_q, "map": table,
                "ms_per_query": {v: round(t * 1000.0 / max(n_q, 1), 2) for v, t in ms.items()},
                "diagnostics_map": diagnostics, "per_query": pq_out, "expansion_sets": qe_out,
                "wall_s": round(time.perf_counter() - t0, 1)}
    finally:
        enc.close()
        store.close()


DIAG_NAMES = {
    "cc": "counts / counts, windows (= paper R)", "cc_full": "counts / counts, full map",
    "cp": "counts query / centre-prior candidates, windows",
    "cp_full": "counts query / centre-prior candidates, full map",
    "pc": "centre-prior query / counts candidates, windows",
    "pc_full": "centre-prior query / counts candidates, full map",
    "pp": "centre prior / centre prior, windows (= R with a box)",
    "pp_full": "centre prior / centre prior, full map",
    "cp_full_l1": "counts query / centre-prior candidates, full map, one level "
                  "(= the first search in GS)",
    "pp_full_l1": "centre prior / centre prior, full map, one level (= a first search "
                  "with a centre-prior query)",
    "pp_l1": "centre prior / centre prior, windows, one level",
    "pp_large_l2": "centre prior / centre prior, the 7 large windows",
    "pp_large_l1": "centre prior / centre prior, the 7 large windows, one level "
                   "(= R without a box)",
}


def markdown(res: dict[str, Any]) -> str:
    out = []
    rows = res["searches"]
    out += ["| variant | " + " | ".join(r["search"] for r in rows) + " |",
            "|---" * (len(rows) + 1) + "|"]
    for v in VARIANTS:
        out.append(f"| {v} | " + " | ".join(f"{r['map'][v]:.4f}" for r in rows) + " |")
    out += ["", "Re-scoring the first stage's top 100 (query side / candidate side weights; "
            "two-level pyramid):", "",
            "| scores | " + " | ".join(r["search"] for r in rows) + " |",
            "|---" * (len(rows) + 1) + "|"]
    for k, name in DIAG_NAMES.items():
        out.append(f"| {name} | " + " | ".join(f"{r['diagnostics_map'][k]:.4f}"
                                              for r in rows) + " |")
    for b in BETAS:
        out.append(f"| first + {b:g} x paper window score | " + " | ".join(
            f"{r['diagnostics_map'][f'fused_{b:g}']:.4f}" for r in rows) + " |")
    for r in rows:
        out += ["", f"{r['search']}, per query (top 10 junk-free; AUC of positives against "
                "negatives inside the top 100):", "",
                "| ranking | positives in top 10 | leaving | entering | negatives entering "
                "(window area) | AUC | mean score pos / neg |", "|---|---|---|---|---|---|---|"]
        for name, p in r["per_query"].items():
            area = p["mean_window_area_of_negatives_entering"]
            out.append(f"| {name} | {p['positives_in_top10_before']} | "
                       f"{p['positives_leaving_top10']} | {p['positives_entering_top10']} | "
                       f"{p['negatives_entering_top10']} "
                       f"({'–' if area is None else f'{area:.3f}'}) | "
                       f"{p['auc_in_top']:.4f} | {p['mean_score_positives']:.4f} / "
                       f"{p['mean_score_negatives']:.4f} |")
        out += ["", "| expansion set | images | positives | junk | queries not expanded |",
                "|---|---|---|---|---|"]
        for name, e in r["expansion_sets"].items():
            out.append(f"| {name} | {e['mean_images']:.2f} | {e['mean_positives']:.2f} | "
                       f"{e['mean_junk']:.2f} | {e['queries_not_expanded']} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", type=Path)
    p.add_argument("--run", type=Path, default=None,
                   help="finished run folder (default: the settings' path_output)")
    p.add_argument("--scratch", type=Path, default=None,
                   help="scratch folder (default: a temporary folder, removed at the end)")
    p.add_argument("--searches", type=int, nargs="+", default=None, choices=(0, 1),
                   help="masking values: 0 = GS, 1 = LS (default: 0 1; GS only without "
                        "query boxes, where LS equals GS)")
    p.add_argument("--set", dest="extra", action="append", default=[],
                   help="further KEY=VALUE overrides (e.g. path_images=DIR)")
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--runs-root", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON written (default benchmarks/results/rerank_fusion_<dataset>.json)")
    a = p.parse_args()
    s0 = load_settings(a.settings, a.extra, data_root=a.data_root, runs_root=a.runs_root)
    run = (a.run or Path(s0.path_output)).resolve()
    for need in ("assignments.lmdb", "index"):
        if not (run / need).exists():
            raise SystemExit(f"{run / need} missing: run steps A-C first")
    tmp = None
    if a.scratch is None:
        tmp = tempfile.mkdtemp(prefix="bench_rerank_fusion_")
        scratch = Path(tmp)
    else:
        scratch = a.scratch.resolve()
    try:
        scratch_run(run, scratch)
        s = load_settings(a.settings, [*a.extra, f"path_output={scratch}",
                                       f"path_models={scratch / 'models'}",
                                       f"path_features={scratch / 'features'}"],
                          data_root=a.data_root, runs_root=a.runs_root)
        gt = load_ground_truth(s)
        has_boxes = any(q.bbox is not None for q in gt.queries)
        searches = a.searches or ([0, 1] if has_boxes else [0])
        rows = [run_search(s, gt, m) for m in searches]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    res = {"settings": str(a.settings), "run": str(run), "extra": a.extra,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "top": int(s["top"]), "qe_top": int(s["qe_top"]), "qe_verify": float(s["qe_verify"]),
           "searches": rows}
    res["markdown"] = markdown(res)
    out = a.out or REPO / "benchmarks" / "results" / f"rerank_fusion_{s.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(res["markdown"])
    print(f"\n-> {out}")


if __name__ == "__main__":
    main()
