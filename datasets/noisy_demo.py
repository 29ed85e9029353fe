#!/usr/bin/env python
"""A generated class-labelled training list with planted wrong labels, to measure the
cleaning of datasets/clean_noisy.py (precision and recall) and to test it.

Why generated: the point is a *known* set of wrong labels. The photos come from the demo
generator (:mod:`datasets.demo`: textured planar objects under perspective warps,
occlusion, lighting changes, on clutter backgrounds). Class ``k`` = the views of object
``k``. Wrong labels, ``noise`` of the final list, are planted two ways (half each):
*swapped* views of another object, and *distractor* photos (clutter only, or an object
of no class), each given a random class. The demo's deliberately tiny/occluded "junk"
views are left out (they are neither clearly right nor clearly wrong).

Files in ``<out>``: ``scenes/`` (the demo set), ``train_noisy.json`` (the list, format of
:mod:`lib.learned.training_data`) and ``truth.json`` (``{path: {"class", "true_class", "wrong"}}``,
``true_class`` null for distractors).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from lib.artefacts import write_json_atomic
from lib.errors import UserError
from lib.learned.training_data import TrainingSet, write_training_json

log = logging.getLogger(__name__)

TRAIN_FILE = "train_noisy.json"
TRUTH_FILE = "truth.json"


def generate_noisy(out: Path, seed: int = 0, n_classes: int = 10, per_class: int = 6,
                   noise: float = 0.2, image_size: tuple[int, int] = (240, 320)
                   ) -> tuple[Path, Path]:
    """Write the noisy list; returns (train_noisy.json, truth.json)."""
    from datasets import demo

    if not 0.0 <= noise < 1.0:
        raise UserError(f"noisy_demo: noise must lie in [0, 1), got {noise}")
    if n_classes < 2 or per_class < 2:
        raise UserError("noisy_demo: need at least 2 classes of at least 2 images")
    out = Path(out)
    n_views = n_classes * per_class
    n_wrong = round(noise / (1.0 - noise) * n_views)
    n_swap = min(n_wrong // 2, n_views // 3)
    n_dist = n_wrong - n_swap
    demo.generate(out / "scenes", seed, n_classes, per_class, n_dist, tuple(image_size))
    info = json.loads((out / "scenes" / demo.PARAMS_FILE).read_text(encoding="utf-8"))["images"]
    names = sorted(n for n, v in info.items() if v["kind"] != "query")
    views = [n for n in names if info[n]["kind"] == "view"]
    dists = [n for n in names if info[n]["kind"] in ("clutter", "other")]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 77]))
    label = {n: int(info[n]["object"]) for n in views}
    truth: dict[str, dict] = {}
    swapped = set(rng.choice(len(views), n_swap, replace=False).tolist()) if n_swap else set()
    for i, n in enumerate(views):
        k = label[n]
        if i in swapped:  # a random *other* class
            label[n] = int((k + 1 + rng.integers(0, n_classes - 1)) % n_classes)
        truth[f"{n}.jpg"] = {"class": f"c{label[n]:03d}", "true_class": f"c{k:03d}",
                             "wrong": label[n] != k}
    for n in dists:
        label[n] = int(rng.integers(0, n_classes))
        truth[f"{n}.jpg"] = {"class": f"c{label[n]:03d}", "true_class": None, "wrong": True}
    paths = sorted(truth)
    ts = TrainingSet(out / "scenes" / "images", paths, [truth[p]["class"] for p in paths])
    write_training_json(out / TRAIN_FILE, ts)
    write_json_atomic(out / TRUTH_FILE, truth)
    n_bad = sum(v["wrong"] for v in truth.values())
    log.info("noisy list: %d images, %d wrong (%d swapped views, %d distractors)",
             len(paths), n_bad, n_bad - len(dists), len(dists))
    return out / TRAIN_FILE, out / TRUTH_FILE


def main() -> None:
    from lib.cli import run_main, setup_logging

    p = argparse.ArgumentParser(prog="datasets/noisy_demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/noisy_demo"),
                   help="output folder (default data/noisy_demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    p.add_argument("--per-class", type=int, default=6, help="correct views per class "
                   "before swaps (default 6)")
    p.add_argument("--noise", type=float, default=0.2,
                   help="fraction of wrong labels in the list (default 0.2)")
    p.add_argument("--size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"),
                   help="landscape photo size (default 240 320)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args()
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        train, truth = generate_noisy(args.out, args.seed, args.classes, args.per_class,
                                      args.noise, tuple(args.size))
        t = json.loads(truth.read_text(encoding="utf-8"))
        print(f"noisy list: {len(t)} images, {sum(v['wrong'] for v in t.values())} wrong "
              f"labels -> {train} (truth {truth})")
        return 0

    run_main(body, "noisy_demo")


if __name__ == "__main__":
    main()
