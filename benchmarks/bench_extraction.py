#!/usr/bin/env python
"""Benchmark of step A: whole-step wall time vs the network's forward alone.

Runs ``lib.features.extraction.run_extraction`` (decoding in DataLoader workers, bucketing,
forward, float16 LMDB writes) into a fresh store on the SMVS DVD images, and, in
rotation with it, the forward passes alone on the same images pre-decoded in memory
with the same batch composition. Reports the medians, their ratio (goal <= 1.10) and
images/s. Settings are generated here (generic ground truth ``gnd_smvs_dvd_all.json``).

    .venv/bin/python benchmarks/bench_extraction.py --data ../shared/data/smvs_dvd
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def extraction_settings(data: Path, gt: str, tmp: Path, name: str, **keys: Any) -> Any:
    """Step A's settings for an image folder with a generic ground truth (the SMVS
    layout), output in ``tmp``: written to ``tmp/<name>.json`` and loaded, so they are
    validated like any settings file. ``keys``: the network, input and loader keys."""
    from lib.settings import load_settings

    cfg = {"dataset": "smvs_dvd", "gt_format": "generic", "path_images": str(data),
           "path_gt": str(data / gt), "path_output": str(tmp / "run"), **keys}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return load_settings(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "smvs_dvd",
                    help="SMVS DVD folder (default: ../shared/data/smvs_dvd)")
    ap.add_argument("--gt", default="gnd_smvs_dvd_all.json")
    ap.add_argument("--network", default="efficientnet_lite0")
    ap.add_argument("--weights", default="default")
    ap.add_argument("--layers", default="s6_expand", help="comma-separated")
    ap.add_argument("--input-size", default="336,256")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--limit", type=int, default=0, help="first N database images (0 = all)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from lib.features.extraction import Extractor, run_extraction
    from lib.features.images import load_image, resize_image
    from lib.groundtruth.loader import image_path, load_ground_truth
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="bench-a-"))
    try:
        s = extraction_settings(
            data, args.gt, tmp, "s", network=args.network, weights=args.weights,
            layers=args.layers.split(","),
            input_size=[int(v) for v in args.input_size.split(",")],
            batch_size=args.batch_size, num_workers=args.workers, device=args.device,
            precision=args.precision)
        ids = load_ground_truth(s).db_ids
        if args.limit:
            ids = ids[: args.limit]

        # forward-only input: the same images, decoded once, same bucketing as step A
        ext = Extractor(s)
        buckets: dict[tuple[int, int], list] = {}
        batches = []
        t_dec = time.perf_counter()
        for i in ids:
            img = load_image(image_path(s, i))
            x = resize_image(img, ext.input_size_for(img.width, img.height), s["antialias"])
            b = buckets.setdefault(tuple(x.shape[1:]), [])
            b.append(x)
            if len(b) == s["batch_size"]:
                batches.append(torch.stack(buckets.pop(tuple(x.shape[1:]))))
        batches += [torch.stack(b) for b in buckets.values()]
        t_dec = time.perf_counter() - t_dec

        def forward_only() -> float:
            t = time.perf_counter()
            for x in batches:
                ext.forward(x)
            return time.perf_counter() - t

        def whole_step(k: int) -> tuple[float, dict]:
            t = time.perf_counter()
            r = run_extraction(s, ids, tmp / f"store{k}.lmdb")
            return time.perf_counter() - t, r

        forward_only()  # warm-up (allocator, kernels)
        fw, st, inner, res = [], [], [], None
        for k in range(args.repeats):
            wall, res = whole_step(k)
            st.append(wall)
            inner.append((res["forward_seconds"], res["wait_seconds"],
                          res["seconds"] - res["loop_seconds"]))
            fw.append(forward_only())
            shutil.rmtree(tmp / f"store{k}.lmdb", ignore_errors=True)
        n = len(ids)
        mf, ms = statistics.median(fw), statistics.median(st)
        print(f"images: {n} ({res['corrupt']} corrupt), network {args.network} "
              f"{args.layers} {args.input_size}, batch {args.batch_size}, workers "
              f"{args.workers}, device {res['device']}, torch threads "
              f"{torch.get_num_threads()}")
        print("whole step  s: " + " ".join(f"{v:.2f}" for v in st) + f"  median {ms:.2f}")
        print("forward only s: " + " ".join(f"{v:.2f}" for v in fw) + f"  median {mf:.2f}")
        print("inside the step (forward / waiting for decoded images / setup) s: "
              + "  ".join(f"{a:.2f}/{b:.2f}/{c:.2f}" for a, b, c in inner))
        print(f"decode + resize alone (one process, once): {t_dec:.2f} s = "
              f"{1000 * t_dec / n:.1f} ms/image")
        print(f"ratio whole/forward = {ms / mf:.3f}; whole step {n / ms:.1f} images/s, "
              f"forward alone {n / mf:.1f} images/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
