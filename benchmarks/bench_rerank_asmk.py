"""Re-ranking after the selective kernel (issue 20, point 4 with ``kernel = asmk``): what
orders the re-ranked top, measured on a finished ``kernel = asmk`` run.

Every query is encoded once (step D's ``QueryEncoder``) and ranked by step D's own
``BowSearcher`` under these settings (query expansion off):

* ``first stage``: ``rerank = false``;
* ``window``: ``rerank_score = window``, the best BoW window orders the top ``top``
  (what step D did with either kernel before ``rerank_score`` existed);
* ``fused w``: ``rerank_score = fused``, ``rerank_fusion_weight = w``: the kernel's score
  divided by the top one's plus ``w`` times the window score divided by the best one's;
* ``default R`` and ``default R+LQE``: the settings as given (``rerank_score = auto``
  is ``fused`` with ``kernel = asmk``), without and with local query expansion.

For each search (GS = masking 0, and LS = masking 1 where the ground truth has boxes):
the mAP (Oxford rule of step E, junk ignored) and, for every variant, the paired
difference to the first stage with its wins and losses over queries. Nothing is written
to the run: the script works in a scratch folder whose artefacts link to the run
(``bench_rerank_fusion.scratch_run``). Results go to
``benchmarks/results/rerank_asmk_<name>.json``.

    # a kernel = asmk run of the demo (C, D, E on a copy of runs/demo), then:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rerank_asmk.py settings/demo.json \\
        --run RUN/demo --set kernel=asmk --name demo
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

from benchmarks.bench_rerank_fusion import Judge, scratch_run
from lib.groundtruth.loader import load_ground_truth
from lib.index.assignment_store import AssignmentStore
from lib.index.inverted_file import InvertedFile
from lib.search.query_encoding import QueryEncoder
from lib.search.searcher import BowSearcher
from lib.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = (0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0)


def variants() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        "first stage": {"rerank": False, "query_expansion": "none"},
        "window": {"rerank": True, "query_expansion": "none", "rerank_score": "window"},
    }
    for w in WEIGHTS:
        out[f"fused {w:g}"] = {"rerank": True, "query_expansion": "none",
                               "rerank_score": "fused", "rerank_fusion_weight": w}
    out["default R"] = {"rerank": True, "query_expansion": "none"}
    out["default R+LQE"] = {"rerank": True, "query_expansion": "lqe"}
    out["default GQE"] = {"rerank": False, "query_expansion": "gqe"}
    out["R+LQE, qe_alpha 0"] = {"rerank": True, "query_expansion": "lqe", "qe_alpha": 0.0}
    out["R+LQE, qe_select verified"] = {"rerank": True, "query_expansion": "lqe",
                                        "qe_select": "verified"}
    out["R+LQE, qe_top 3"] = {"rerank": True, "query_expansion": "lqe", "qe_top": 3}
    return out


def run_search(s: Any, gt: Any, store: AssignmentStore, index: InvertedFile,
               masking: int) -> dict[str, Any]:
    s = s.replace(masking=masking)
    enc = QueryEncoder(s, store)
    judge = Judge(gt, list(index.image_ids))
    searchers = {v: BowSearcher(s.replace(**ch), index, store) for v, ch in variants().items()}
    aps: dict[str, list[float]] = {v: [] for v in searchers}
    t0 = time.perf_counter()
    for q in gt.queries:
        eq = enc.encode(q)
        for v, srch in searchers.items():
            aps[v].append(judge.ap(q, srch.rank(eq).order))
    first = np.array(aps["first stage"])
    rows = {}
    for v, a in aps.items():
        d = np.array(a) - first
        rows[v] = {"map": float(np.nanmean(a)), "diff": float(np.nanmean(d)),
                   "wins": int((d > 1e-12).sum()), "losses": int((d < -1e-12).sum())}
    return {"n_queries": len(first), "seconds": time.perf_counter() - t0, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", type=Path)
    ap.add_argument("--run", type=Path, required=True, help="a finished kernel = asmk run")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="settings overrides (kernel=asmk and the "
                    "run's asmk keys)")
    ap.add_argument("--name", required=True, help="names the results file")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-rerank-asmk-"))
    try:
        run = scratch_run(args.run.resolve(), scratch / "run")
        s = load_settings(args.settings.resolve(), [*args.overrides, f"path_output={run}"])
        if s["kernel"] != "asmk":
            raise SystemExit("this benchmark measures kernel = asmk: pass --set kernel=asmk")
        gt = load_ground_truth(s)
        store = AssignmentStore(AssignmentStore.path_for(s))
        index = InvertedFile.load(run / "index")
        searches = {"GS": run_search(s, gt, store, index, 0)}
        if any(q.bbox is not None for q in gt.queries):
            searches["LS"] = run_search(s, gt, store, index, 1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for name, res in searches.items():
        print(f"{name} ({res['n_queries']} queries, {res['seconds']:.0f} s)")
        for v, r in res["rows"].items():
            print(f"  {v:<26} mAP {r['map']:.4f}  diff {r['diff']:+.4f}  "
                  f"wins {r['wins']:>3}  losses {r['losses']:>3}")
    out = REPO / "benchmarks" / "results" / f"rerank_asmk_{args.name}.json"
    out.write_text(json.dumps({
        "command": "benchmarks/bench_rerank_asmk.py " + " ".join(
            [str(args.settings), "--run", str(args.run.name),
             *[f"--set {o}" for o in args.overrides], "--name", args.name]),
        "date": time.strftime("%Y-%m-%d"), "searches": searches}, indent=1) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
