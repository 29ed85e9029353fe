"""Check our AP against independent implementations of the official rules, on the real
Oxford5k, Paris6k and revisited ground truth (../shared/data/ground_truth).

Why: published numbers depend on the exact AP variant (field_notes §4). Two references
are written here from the rule descriptions (not from the official code):
- ``official_oxford_f32``: the compute_ap walk of spec §4.1 in float32 arithmetic, as the
  C++ program keeps recall/precision/AP in floats;
- ``official_revisited``: the revisited ``compute_ap`` k/r form (field_notes §4): positions
  of positives in the full ranking, shifted down by the junk ranked before them, then
  sum over the k-th positive at junk-free rank r of (k/r + (k+1)/(r+1))/2/npos
  (k/r := 1 at r = 0); and mP@k with the min(max positive rank, k) divisor.
Rankings: random permutations, and adversarial ones (junk first, positives last, junk
interleaved between positives, query's positives at rank 0, truncated lists).
Prints the maximum differences; exits 1 when one exceeds 1e-6.

    .venv/bin/python benchmarks/check_ap_official.py [--data ../shared/data/ground_truth]
    .venv/bin/python benchmarks/check_ap_official.py --read-timing   # E's input cost

``--read-timing`` instead times reading a 105k-image ranking folder (55 random lists,
written with lib.search.rankings) and evaluating it: median of 3 reads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lib.evaluation.metrics import average_precision, evaluate
from lib.groundtruth.common import GroundTruth
from lib.groundtruth.oxford_paris import read_gt_files
from lib.groundtruth.revisited import read_revisited
from lib.search.rankings import Rankings

TOL = 1e-6
REPO = Path(__file__).resolve().parent.parent


def official_oxford_f32(ranked: list[str], pos: set[str], amb: set[str]) -> float:
    """spec §4.1 walk with the C++ float variables emulated in float32."""
    f = np.float32
    old_recall, old_precision, ap = f(0.0), f(1.0), f(0.0)
    hits, j = 0, 0
    for image in ranked:
        if image in amb:
            continue
        if image in pos:
            hits += 1
        recall = f(hits / float(len(pos)))
        precision = f(hits / (j + 1.0))
        ap = f(float(ap) + (float(recall) - float(old_recall))
               * ((float(old_precision) + float(precision)) / 2.0))
        old_recall, old_precision = recall, precision
        j += 1
    return float(ap)


def official_revisited(order: np.ndarray, ok: np.ndarray, junk: np.ndarray,
                       kappas=(1, 5, 10)) -> tuple[float, np.ndarray]:
    """k/r form of the revisited compute_ap, and mP@k with the official quirk."""
    pos = np.flatnonzero(np.isin(order, ok))
    jk = np.flatnonzero(np.isin(order, junk) & ~np.isin(order, ok))
    # junk-free position: shift each positive down by the junk ranked above it
    pos = pos - np.searchsorted(jk, pos)
    ap = 0.0
    for k, r in enumerate(pos):
        prec0 = 1.0 if r == 0 else k / r
        ap += (prec0 + (k + 1) / (r + 1)) / 2.0
    ap /= len(ok)
    p1 = pos + 1
    prs = np.zeros(len(kappas))
    if p1.size:
        for i, kk in enumerate(kappas):
            kq = min(p1.max(), kk)
            prs[i] = (p1 <= kq).sum() / kq
    return ap, prs


def rankings_for(gt: GroundTruth, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """Named sets of rankings (query -> db index order)."""
    n = len(gt.db_ids)
    index = {i: k for k, i in enumerate(gt.db_ids)}
    out: dict[str, dict[str, np.ndarray]] = {"random": {}, "junk_first": {},
                                             "positives_last": {}, "interleaved": {},
                                             "truncated": {}, "good_early": {}}
    for q in gt.queries:
        pos = np.array(sorted(index[i] for i in q.positives if i in index), dtype=np.int64)
        junk = np.array(sorted(index[i] for i in q.junk | (q.hard or frozenset())
                               if i in index and i not in q.positives), dtype=np.int64)
        rest = np.setdiff1d(np.arange(n), np.concatenate([pos, junk]))
        rp, rj, rr = rng.permutation(pos), rng.permutation(junk), rng.permutation(rest)
        out["random"][q.name] = rng.permutation(n)
        out["junk_first"][q.name] = np.concatenate([rj, rp, rr])
        out["positives_last"][q.name] = np.concatenate([rj, rr, rp])
        # junk between positives, a few negatives sprinkled in
        inter = []
        for a, b in zip(np.array_split(rp, max(len(rj), 1)), np.array_split(rj, max(len(rj), 1))):
            inter.extend([*a.tolist(), *b.tolist()])
        used = set(inter)
        inter.extend(x for x in rr.tolist() if x not in used)
        inter = np.array(inter, dtype=np.int64)
        out["interleaved"][q.name] = inter
        out["truncated"][q.name] = rng.permutation(n)[: n // 3]
        mix = np.concatenate([rp[: len(rp) // 2], rr[:50], rj, rp[len(rp) // 2:], rr[50:]])
        out["good_early"][q.name] = mix
    return out


def check(gt: GroundTruth, rng: np.random.Generator) -> dict[str, float]:
    diffs = {"vs_oxford_f32": 0.0, "walk_vs_revisited_k/r": 0.0, "E_vs_revisited_k/r": 0.0,
             "E_mAP_vs_revisited": 0.0}
    if gt.protocol == "revisited":
        diffs["mP@k"] = 0.0
    ids = np.asarray(gt.db_ids, dtype=object)
    index = {i: k for k, i in enumerate(gt.db_ids)}
    for _name, orders in rankings_for(gt, rng).items():
        rk = Rankings(list(orders), {q: ids[o].tolist() for q, o in orders.items()}, {}, None,
                      dict(orders))
        res = evaluate(gt, rk)
        blocks = ({"medium": res["medium"], "easy": res["easy"], "hard": res["hard"]}
                  if gt.protocol == "revisited" else {"plain": res})
        for bname, block in blocks.items():
            aps = []
            for q in gt.queries:
                if bname == "easy":
                    okset, jset = q.easy, q.junk | q.hard
                elif bname == "hard":
                    okset, jset = q.hard, q.junk | q.easy
                else:
                    okset, jset = q.positives, q.junk
                if not okset:
                    assert block["per_query"][q.name] is None
                    continue
                ok = np.array([index[i] for i in okset], dtype=np.int64)
                jk = np.array([index[i] for i in jset if i in index], dtype=np.int64)
                ref, prs = official_revisited(orders[q.name], ok, jk)
                ranked = ids[orders[q.name]].tolist()
                ours_walk = average_precision(ranked, okset, jset)
                ours_e = block["per_query"][q.name]
                aps.append(ref)
                diffs["walk_vs_revisited_k/r"] = max(diffs["walk_vs_revisited_k/r"],
                                                     abs(ours_walk - ref))
                diffs["E_vs_revisited_k/r"] = max(diffs["E_vs_revisited_k/r"], abs(ours_e - ref))
                if bname in ("plain", "medium") and _name in ("random", "interleaved"):
                    f32 = official_oxford_f32(ranked, set(okset), set(jset))
                    diffs["vs_oxford_f32"] = max(diffs["vs_oxford_f32"], abs(ours_e - f32))
                if bname != "plain":  # per-query mP@k is not stored: compare the means
                    block.setdefault("_mp", []).append(prs)
            diffs["E_mAP_vs_revisited"] = max(diffs["E_mAP_vs_revisited"],
                                              abs(block["map"] - float(np.mean(aps))))
            if bname != "plain":
                ref_mp = np.mean(block.pop("_mp"), axis=0)
                ours_mp = np.array([block["mp@1"], block["mp@5"], block["mp@10"]])
                diffs["mP@k"] = max(diffs["mP@k"], float(np.abs(ref_mp - ours_mp).max()))
    return diffs


def fake_image_folder(root: Path, path_gt: Path, n_extra: int) -> Path:
    """Empty .jpg files for every id the gt files name, plus unjudged fillers (the real
    images are not available here; the reader only lists file names)."""
    names: set[str] = set()
    for f in path_gt.glob("*.txt"):
        for ln in f.read_text().splitlines():
            if ln.strip():
                w = ln.split()[0]
                names.add(w[5:] if w.startswith("oxc1_") else w)
    names.update(f"filler_{i:06d}" for i in range(n_extra))
    img = root / path_gt.name
    img.mkdir(parents=True)
    for n in names:
        (img / f"{n}.jpg").touch()
    return img


def read_timing(n: int = 105_000, nq: int = 55, seed: int = 0) -> None:
    """Time read_ranking_folder + evaluate on an Oxford105k-sized synthetic folder."""
    from lib.groundtruth.common import Query
    from lib.search.rankings import rank_scores, read_ranking_folder, write_ranking_folder

    rng = np.random.default_rng(seed)
    db = [f"d{i // 1000:03d}/image_{i:07d}" for i in range(n)]
    scores = rng.random((nq, n)).astype(np.float32)
    qs = [Query(f"q{i}", db[i], None, frozenset(rng.choice(db, 50).tolist()),
                frozenset(rng.choice(db, 20).tolist())) for i in range(nq)]
    gt = GroundTruth("synthetic", "generic", db, qs)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bow"
        t0 = time.perf_counter()
        write_ranking_folder(out, [q.name for q in qs], db, scores, rank_scores(scores), {})
        t_write = time.perf_counter() - t0
        reads = []
        for _ in range(3):
            t0 = time.perf_counter()
            rk = read_ranking_folder(out, db)
            reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        evaluate(gt, rk)
        t_eval = time.perf_counter() - t0
    print(f"{nq} lists x {n} ids: rank+write {t_write:.2f} s, read median "
          f"{sorted(reads)[1]:.2f} s (runs " + ", ".join(f"{r:.2f}" for r in reads)
          + f"), evaluate {t_eval:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "../shared/data/ground_truth",
                    help="folder with oxford5k/, paris6k/, revisited/ (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--read-timing", action="store_true",
                    help="time reading + evaluating a 105k-image ranking folder instead")
    args = ap.parse_args()
    if args.read_timing:
        read_timing(seed=args.seed)
        return
    data = args.data.resolve()
    rng = np.random.default_rng(args.seed)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        sets = [
            ("oxford5k", lambda: read_gt_files(
                data / "oxford5k", fake_image_folder(Path(tmp), data / "oxford5k", 2000),
                "oxford5k")),
            ("paris6k", lambda: read_gt_files(
                data / "paris6k", fake_image_folder(Path(tmp), data / "paris6k", 2000),
                "paris6k")),
            ("roxford5k", lambda: read_revisited(data / "revisited/gnd_roxford5k.pkl",
                                                 Path(tmp), "roxford5k")),
            ("rparis6k", lambda: read_revisited(data / "revisited/gnd_rparis6k.pkl",
                                                Path(tmp), "rparis6k")),
        ]
        for name, make in sets:
            t0 = time.perf_counter()
            gt = make()
            d = check(gt, rng)
            worst = max(worst, *d.values())
            print(f"{name}: {len(gt.queries)} queries, {len(gt.db_ids)} db images; max |diff| "
                  + ", ".join(f"{k} {v:.2e}" for k, v in d.items())
                  + f" ({time.perf_counter() - t0:.1f} s)")
    print(f"max |diff| over all checks: {worst:.2e} (tolerance {TOL:g})")
    sys.exit(0 if worst <= TOL else 1)


if __name__ == "__main__":
    main()
