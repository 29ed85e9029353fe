#!/usr/bin/env python
"""Multi-scale extraction for BLCF's BoW: a measurement on a finished run, first stage
only (issue 20, point 5: what HOW-style systems do).

Scale 1 is the run itself: its assignment store and query maps. For every other scale
``s`` the same network sees each image at ``s`` times the settings' ``input_size`` and
its maps are upsampled by the run's own factor (``new_dim`` times ``s``); the run's
PCA-whitening and codebook then give the words, with the run's ``keep_cells`` applied
per map (step C's ``words_from_maps``). An image's vector is the sum over scales of its
L2-normalised per-scale BoW (step C's ``database_vector``; queries step D's
``QueryEncoder.encode_words``, box and centre prior included), each scale weighted
``equal`` (1 each) or by ``area`` (s squared: every cell counts the same). Reports mAP,
the paired difference to scale 1 with bootstrap 95 % intervals over queries and over
objects, and wins/losses. The run folder is only read; the extra scales' maps are
cached in the scratch folder given by ``--cache`` (kept between calls).

    .venv/bin/python benchmarks/bench_multiscale.py G --run RUN --cache $SCRATCH/ms
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.bench_strongest_cells import search_all
from lib.features.extraction import Extractor
from lib.features.images import load_image
from lib.groundtruth.loader import image_path, load_ground_truth
from lib.index.assignment_store import AssignmentStore
from lib.index.bow import l2_normalise, sparse_sum
from lib.index.encoding import database_vector, words_from_maps
from lib.search.query_encoding import QueryEncoder, combined_maps
from lib.settings import load_settings, parse_override
from lib.vocabulary.sizing import resolve_from_codebook

REPO = Path(__file__).resolve().parent.parent


def scaled(size: list[int], s: float) -> list[int]:
    return [max(1, round(v * s)) for v in size]


def scale_maps(base, overrides: dict, s: float, ids: list[str], query_ids: list[str],
               enc: QueryEncoder, cache: Path) -> tuple[dict, dict]:
    """Word maps of the database images and of the query images (by id) at scale ``s``
    (cached as .npz in ``cache``)."""
    f = cache / f"scale_{s:.4f}.npz"
    if f.exists():  # maps by position in ids / query_ids (no pickles)
        with np.load(f) as z:
            return ({i: z[f"d{k}"] for k, i in enumerate(ids)},
                    {i: z[f"q{k}"] for k, i in enumerate(query_ids)})
    ss = load_settings(base, {**overrides, "input_size": scaled(list(enc.s["input_size"]), s),
                              "new_dim": scaled(list(enc.s["new_dim"]), s)})
    ext = Extractor(ss)
    keep = float(ss["keep_cells"])

    def words(image_id: str, query: bool):
        img = load_image(image_path(ss, image_id, query=query), int(ss["max_image_pixels"]))
        maps = combined_maps(ext.extract(img), list(ss["layers"]), ss["new_dim"])
        return words_from_maps(maps, enc.pca, enc.codebook, bool(ss["l2norm"]), keep)

    db = {i: words(i, False) for i in tqdm(ids, desc=f"scale {s:.3f} database")}
    same_root = ss["path_queries"] in (None, ss["path_images"])
    q = {i: db[i] if same_root and i in db else words(i, True)
         for i in tqdm(query_ids, desc=f"scale {s:.3f} queries")}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(f, **{f"d{k}": db[i] for k, i in enumerate(ids)},
             **{f"q{k}": q[i] for k, i in enumerate(query_ids)})
    return db, q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", type=Path)
    ap.add_argument("--run", type=Path, required=True, help="finished run (A-C; read only)")
    ap.add_argument("--scales", type=float, nargs="+", default=[2 ** -0.5, 0.5, 2 ** 0.5])
    ap.add_argument("--cache", type=Path, required=True, help="scratch folder for the maps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="settings override (as for the steps), e.g. the dataset's paths")
    ap.add_argument("--results", type=Path, default=None, help="write the rows as JSON")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ms-"))
    try:
        run(args, args.run.resolve(), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, run_dir: Path, tmp: Path) -> None:
    base = args.settings.resolve()
    over = dict(parse_override(kv, base) for kv in args.set)
    # the run's models and features; path_output only names the scratch query cache
    over.update({"rerank": False, "query_expansion": "none", "augmentation": 0,
                 "path_models": str(run_dir / "models"),
                 "path_features": str(run_dir / "features"),
                 "path_output": str(tmp / "out")})
    s = load_settings(base, over)
    if s["n_centers"] == "auto":  # the size step B chose, as the steps that read models do
        over["n_centers"] = int(resolve_from_codebook(s)["n_centers"])
        s = load_settings(base, over)
    gt = load_ground_truth(s)
    ids = list(gt.db_ids)
    store = AssignmentStore(run_dir / "assignments.lmdb")
    enc = QueryEncoder(s, store)
    n_words = enc.n_words
    q_names = [q.name for q in gt.queries]
    q_ids = sorted({q.image for q in gt.queries})
    # scale 1: the run's own maps (queries: the database's map, or through the network
    # as step D does; the scratch cache is empty)
    maps = {1.0: ({i: store.get(i)[0] for i in ids}, {i: enc.words(i)[0][0] for i in q_ids})}
    hw = {i: enc.words(i)[1] for i in q_ids}
    for sc in args.scales:
        t0 = time.perf_counter()
        maps[sc] = scale_maps(base, over, sc, ids, q_ids, enc, args.cache)
        print(f"scale {sc:.4f}: maps {next(iter(maps[sc][0].values())).shape} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def vectors(sc: float):
        db, q = maps[sc]
        dbv = [database_vector(db[i], s["weighting"], n_words) for i in ids]
        qv = [enc.encode_words(qq.name, qq.image, [q[qq.image]], hw[qq.image], qq.bbox).vector
              for qq in gt.queries]
        return dbv, qv

    vecs = {sc: vectors(sc) for sc in maps}
    rng = np.random.default_rng(0)
    boot = rng.integers(0, len(q_names), (10000, len(q_names)))
    # objects: queries sharing their positives (the SMVS queries are 4 photos of each DVD)
    obj_of = [min(q.positives) if q.positives else q.name for q in gt.queries]
    objs = sorted(set(obj_of))
    members = [np.array([k for k, o in enumerate(obj_of) if o == ob]) for ob in objs]

    def cluster_ci(d: np.ndarray) -> tuple[float, float]:
        r = np.random.default_rng(1)
        means = []
        for _ in range(2000):
            pick = r.integers(0, len(members), len(members))
            means.append(np.concatenate([d[members[p]] for p in pick]).mean())
        lo, hi = np.percentile(means, [2.5, 97.5])
        return float(lo), float(hi)

    rows, base_ap = [], None
    others = [sc for sc in maps if sc != 1.0]
    sets = [(1.0,)] + [(1.0, sc) for sc in others] + \
        [(1.0, *c) for n in range(2, len(others) + 1) for c in combinations(others, n)]
    for scales in sets:
        for mode in (("equal",) if len(scales) == 1 else ("equal", "area")):
            wts = [1.0 if mode == "equal" else sc * sc for sc in scales]
            dbv = [l2_normalise(sparse_sum([vecs[sc][0][k] for sc in scales], wts))
                   for k in range(len(ids))]
            qv = [l2_normalise(sparse_sum([vecs[sc][1][k] for sc in scales], wts))
                  for k in range(len(q_names))]
            name = "+".join(f"{sc:.3g}" for sc in scales) + f" {mode}"
            res = search_all(tmp, name.replace(" ", "_").replace("+", "_"), dbv, qv, ids,
                             n_words, gt, q_names)
            ap_ = np.array([res["per_query"][n] for n in q_names])
            if base_ap is None:
                base_ap = ap_
            d = ap_ - base_ap
            lo, hi = np.percentile(d[boot].mean(axis=1), [2.5, 97.5])
            clo, chi = cluster_ci(d)
            row = {"scales": list(scales), "weights": mode, "map": res["map"],
                   "diff": float(d.mean()), "ci": [float(lo), float(hi)],
                   "ci_objects": [clo, chi], "wins": int((d > 1e-9).sum()),
                   "losses": int((d < -1e-9).sum())}
            rows.append(row)
            print(f"{name:28s} mAP {res['map']:.4f}  diff {d.mean() * 100:+.2f} "
                  f"[{lo * 100:+.2f}, {hi * 100:+.2f}] objects [{clo * 100:+.2f}, "
                  f"{chi * 100:+.2f}]  w/l {row['wins']}/{row['losses']}", flush=True)
    if args.results:
        args.results.write_text(json.dumps({"command": "bench_multiscale.py",
                                            "settings": str(args.settings), "set": args.set,
                                            "date": time.strftime("%Y-%m-%d"),
                                            "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
