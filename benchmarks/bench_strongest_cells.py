#!/usr/bin/env python
"""Keeping only the strongest cells of each map (by activation norm) in BLCF's BoW: a
measurement on a finished run, first stage only (issue 20).

Each cell's strength is the L2 norm of its raw feature on the map the words were
assigned on (the reader's ``new_dim`` upsampling, no L2/PCA). Variants weight every
database and query cell by the centre prior times [the cell is among the image's top
fraction f by norm] and/or times its norm; a control keeps the same number of cells at
random. Everything else is the library's: the stored word maps, ``database_vector`` /
``bow_vector``, step D's ``QueryEncoder.encode_words`` / ``query_vector``, the inverted
file and ``evaluate``. Reports mAP, the paired difference to the baseline with a
bootstrap 95 % interval over queries and over objects (the SMVS queries are 4 photos of
each of 100 DVDs), and wins/losses. The run folder is only read.

    .venv/bin/python benchmarks/bench_strongest_cells.py --run runs/smvs_dvd
    .venv/bin/python benchmarks/bench_strongest_cells.py --run runs/smvs_dvd --only "f=0.75"
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lib.evaluation.metrics import evaluate
from lib.features.feature_store import FeatureStore
from lib.features.local_features import LocalFeatureReader
from lib.groundtruth.loader import load_ground_truth
from lib.index.assignment_store import AssignmentStore
from lib.index.bow import bow_vector, centre_prior
from lib.index.encoding import cell_strength, database_vector, strongest_cells
from lib.index.inverted_file import InvertedFile
from lib.search.query_encoding import QueryEncoder, query_vector
from lib.search.rankings import Rankings
from lib.settings import load_settings

REPO = Path(__file__).resolve().parent.parent


def settings(path: Path, run: Path, tmp: Path):
    # path_output only names where an (unused) query cache would live: the scratch
    # folder, so nothing in the run folder is touched; models and features are the run's
    return load_settings(path, {"rerank": False, "path_output": str(tmp / "out"),
                                "path_models": str(run / "models"),
                                "path_features": str(run / "features")})


def cell_norms(s, ids, words):
    """Per image, the L2 norm of each raw cell of the (upsampled to new_dim) map that the
    words were assigned on; cached in /tmp."""
    t0 = time.perf_counter()
    reader = LocalFeatureReader(FeatureStore(FeatureStore.path_for(s)),
                                list(s["new_dim"]), l2norm=False, pca=None,
                                layers=list(s["layers"]))
    out = {}
    for i in ids:
        n = cell_strength(reader.maps(i))  # on the maps upsampled like step C's
        if n.shape != words[i].shape:
            raise SystemExit(f"{i}: norm map {n.shape} vs word map {words[i].shape}")
        out[i] = n
    return out, time.perf_counter() - t0


def cell_weights(words, norm, prior: bool, frac: float, soft: float, rand: bool = False):
    """Weight map: centre prior (or 1) x [top-frac cells by norm] x norm**soft."""
    h, w = words.shape
    wt = centre_prior(h, w).astype(np.float64) if prior else np.ones((h, w))
    if frac < 1.0:
        rank_by = norm
        if rand:  # control: the same number of cells kept at random
            rank_by = np.random.default_rng(norm.size + int(norm.sum() * 1000) % 9973
                                            ).random(norm.shape)
        wt = wt * strongest_cells(rank_by, frac)  # step C's rule (keep_cells)
    if soft:
        wt = wt * np.power(norm.astype(np.float64), soft)
    return wt


def search_all(tmp, name, db_vecs, q_vecs, ids, n_words, gt, q_names):
    path = tmp / "idx" / name
    if path.exists():
        shutil.rmtree(path)
    index = InvertedFile.build(path, db_vecs, n_words, ids, {"variant": name})
    assert list(index.image_ids) == list(gt.db_ids)
    orders = {}
    for qn, qv in zip(q_names, q_vecs):
        order, _ = index.search(qv)
        orders[qn] = order
    rk = Rankings(list(q_names), {}, {}, indices=orders)
    res = evaluate(gt, rk)
    shutil.rmtree(path)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", type=Path, default=REPO / "settings" / "smvs_dvd.json")
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "smvs_dvd",
                    help="finished run folder (steps A-C; read only)")
    ap.add_argument("--only", nargs="*", default=[], help="variants whose name contains")
    ap.add_argument("--results", type=Path, default=None, help="write the rows as JSON")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cells-"))
    try:
        run(args, args.run.resolve(), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, run_dir: Path, tmp: Path) -> None:
    s = settings(args.settings.resolve(), run_dir, tmp)
    gt = load_ground_truth(s)
    ids = list(gt.db_ids)
    store = AssignmentStore(run_dir / "assignments.lmdb")
    words = {i: store.get(i)[0] for i in ids}
    enc = QueryEncoder(s, store)
    n_words = enc.n_words
    q_names = [q.name for q in gt.queries]
    # ---- how step D gets the query's map: query cache (if present) or the db store
    qc = run_dir / "query_words.lmdb"
    same = None
    if (qc / "data.mdb").exists():
        with AssignmentStore(qc) as c:
            ck = {k.split("#")[0]: k for k in c.ids()}
            same = sum(np.array_equal(c.get(ck[q.image])[0], words[q.image])
                       for q in gt.queries if q.image in ck)
    in_db = sum(q.image in words for q in gt.queries)
    self_junk = sum(q.image in q.junk for q in gt.queries)
    print(f"queries {len(q_names)}, in database {in_db}, query image in its own junk "
          f"{self_junk}, query-cache maps equal to the db maps: {same}")

    # ---- baseline exactly as C and D build it
    t0 = time.perf_counter()
    db0 = [database_vector(words[i], s["weighting"], n_words) for i in ids]
    hw = {q.image: store.get(q.image)[1] for q in gt.queries}
    q0 = [enc.encode_words(q.name, q.image, [words[q.image]], hw[q.image], q.bbox).vector
          for q in gt.queries]
    base = search_all(tmp, "baseline", db0, q0, ids, n_words, gt, q_names)
    t_base = time.perf_counter() - t0
    # against the shipped run's index and per-query AP
    shipped = InvertedFile.load(run_dir / "index")
    ship_res = json.loads((run_dir / "bow" / "results.json").read_text())
    # first stage against the shipped index itself
    orders = {qn: shipped.search(qv)[0] for qn, qv in zip(q_names, q0)}
    ship_first = evaluate(gt, Rankings(list(q_names), {}, {}, indices=orders))
    print(f"baseline (harness index) mAP {base['map']:.6f}; shipped index, harness queries "
          f"{ship_first['map']:.6f}; run's bow/results.json {ship_res['map']:.6f} "
          f"(settings rerank={ship_res['settings']['rerank']}); {t_base:.1f} s")
    pq_ship = ship_res["per_query"]
    mism = [n for n in q_names if abs(pq_ship[n] - base["per_query"][n]) > 1e-9]
    print(f"per-query AP differing from the run's bow/ (re-ranked): {len(mism)}")

    norms, t_norm = cell_norms(s, ids, words)
    print(f"cell norms: {t_norm:.1f} s")
    allv = np.concatenate([n.ravel() for n in norms.values()])
    print(f"norm stats: min {allv.min():.3f} median {np.median(allv):.3f} max {allv.max():.3f}")

    base_ap = np.array([base["per_query"][n] for n in q_names])
    rng = np.random.default_rng(0)
    boot = rng.integers(0, len(q_names), (10000, len(q_names)))
    # cluster bootstrap: the 400 queries are 4 phone photos of each of 100 DVDs
    objs = sorted({n.split("/")[-1] for n in q_names})
    members = np.array([[k for k, n in enumerate(q_names) if n.split("/")[-1] == o]
                        for o in objs])
    cboot = members[rng.integers(0, len(objs), (10000, len(objs)))].reshape(10000, -1)

    variants = []
    for f in (0.95, 0.9, 0.85, 0.8, 0.7, 0.6):
        variants.append((f"hard f={f} x prior", True, f, 0.0, "both"))
    for f in (1.0, 0.75, 0.5, 0.3):
        variants.append((f"hard f={f} x prior", True, f, 0.0, "both"))
    for f in (1.0, 0.75, 0.5, 0.3):
        variants.append((f"hard f={f} (no prior)", False, f, 0.0, "both"))
    variants += [("soft norm (no prior)", False, 1.0, 1.0, "both"),
                 ("soft norm x prior", True, 1.0, 1.0, "both"),
                 ("soft norm^2 x prior", True, 1.0, 2.0, "both"),
                 ("soft norm^0.5 x prior", True, 1.0, 0.5, "both"),
                 ("soft norm x prior, f=0.5", True, 0.5, 1.0, "both"),
                 ("hard f=0.5 x prior, db only", True, 0.5, 0.0, "db"),
                 ("hard f=0.5 x prior, query only", True, 0.5, 0.0, "query"),
                 ("soft norm x prior, db only", True, 1.0, 1.0, "db"),
                 ("soft norm x prior, query only", True, 1.0, 1.0, "query"),
                 ("soft norm x prior, f=0.75", True, 0.75, 1.0, "both"),
                 ("RANDOM f=0.75 x prior (control)", True, 0.75, 0.0, "both"),
                 ("RANDOM f=0.5 x prior (control)", True, 0.5, 0.0, "both")]
    if args.only:
        variants = [v for v in variants if any(a in v[0] for a in args.only)]
    rows = []
    for name, prior, frac, soft, side in variants:
        t0 = time.perf_counter()
        wdb = {i: cell_weights(words[i], norms[i], prior, frac, soft, "RANDOM" in name)
               for i in ids}
        dbv = [bow_vector(words[i].astype(np.int64), n_words, wdb[i]) if side != "query"
               else db0[k] for k, i in enumerate(ids)]
        qv = [query_vector([words[q.image]], [wdb[q.image]], n_words) if side != "db"
              else q0[k] for k, q in enumerate(gt.queries)]
        res = search_all(tmp, name.replace(" ", "_").replace("=", "").replace(",", ""), dbv, qv,
                         ids, n_words, gt, q_names)
        dt = time.perf_counter() - t0
        ap = np.array([res["per_query"][n] for n in q_names])
        d = ap - base_ap
        bm = d[boot].mean(axis=1)
        lo, hi = np.percentile(bm, [2.5, 97.5])
        clo, chi = np.percentile(d[cboot].mean(axis=1), [2.5, 97.5])
        row = {"variant": name, "map": res["map"], "diff": float(d.mean()),
               "ci": [float(lo), float(hi)], "ci_cluster": [float(clo), float(chi)],
               "wins": int((d > 1e-9).sum()), "losses": int((d < -1e-9).sum()),
               "seconds": round(dt, 2)}
        rows.append(row)
        print(f"{name:36s} mAP {res['map']:.4f}  diff {d.mean()*100:+.2f} "
              f"[{lo*100:+.2f}, {hi*100:+.2f}] cl[{clo*100:+.2f}, {chi*100:+.2f}]  "
              f"w/l {row['wins']}/{row['losses']}  {dt:.1f} s", flush=True)
    if args.results:
        args.results.write_text(json.dumps({"run": str(run_dir), "baseline_map": base["map"],
                                            "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
