"""Scale curves of the inverted file: build time, peak RSS, query time and index size
versus database size (synthetic assignment maps, see bench_inverted_file.py for the
word distribution). Each build runs in its own child process (its peak RSS is read with
getrusage there); data are generated in chunks of 4,096 images, so generation stays
within memory at any size.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py --sizes 10000,100000,1000000

Writes benchmarks/results/scale.csv and scale_<metric>.png (``--out X.csv``: X_<metric>.png).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
from pathlib import Path

from benchmarks.bench_inverted_file import (
    RESULTS,
    index_bytes,
    line_plot,
    make_generator,
    measure_build,
    measure_queries,
)
from lib.allocator import retain_freed_memory


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000",
                    help="comma-separated database sizes")
    ap.add_argument("--queries", type=int, default=10, help="queries per kind and size")
    ap.add_argument("--zipf-s", type=float, default=0.9)
    ap.add_argument("--zipf-r0", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-maps", type=Path, default=None,
                    help="a step-C store of 42x32 maps: relabelled real maps instead of Zipf "
                    "(see bench_inverted_file.RealMaps)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch folder for the indexes (default: a temporary folder); "
                    "1M images need ~15 GB free while building")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.csv")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    retain_freed_memory()  # as the pipeline scripts do (lib/allocator.py)
    sizes = [int(x) for x in a.sizes.split(",")]
    gen = make_generator(a.real_maps, a.zipf_s, a.zipf_r0, a.seed)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="blcf-bench-scale-"))
    rows = []
    try:
        for n in sizes:
            out = work / f"index-{n}"
            b = measure_build(out, n, a.zipf_s, a.zipf_r0, a.seed, real_maps=a.real_maps)
            ib = index_bytes(out)
            q = measure_queries(out, gen, a.queries)
            shutil.rmtree(out, ignore_errors=True)
            row = {"n_images": n, "n_postings": b["n_postings"],
                   "index_mib": round(ib["total_bytes"] / 2**20, 1),
                   "bytes_per_posting": round(ib["postings_bytes"] / b["n_postings"], 3),
                   "build_s": round(b["build_s"], 1), "peak_rss_gib": round(b["peak_rss_gib"], 3),
                   "load_ms": round(q["load_ms"], 1)}
            for kind in ("box", "full"):
                row[f"{kind}_touched"] = int(q[kind]["postings_touched"])
                row[f"{kind}_scores_ms"] = round(q[kind]["scores_ms"], 2)
                row[f"{kind}_scores_cpu_ms"] = round(q[kind]["scores_cpu_ms"], 2)
                row[f"{kind}_search_ms"] = round(q[kind]["search_ms"], 2)
                row[f"{kind}_top100_ms"] = round(q[kind]["search_top100_ms"], 2)
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    x = [r["n_images"] for r in rows]
    d, stem = a.out.parent, a.out.stem  # plots <stem>_build.png etc. next to the csv
    line_plot(d / f"{stem}_build.png", {"build time (s)": (x, [r["build_s"] for r in rows])},
              "inverted file build time", "database images", "seconds")
    line_plot(d / f"{stem}_memory.png",
              {"peak RSS (GiB)": (x, [r["peak_rss_gib"] for r in rows]),
               "index size (GiB)": (x, [r["index_mib"] / 1024 for r in rows])},
              "build peak memory and index size", "database images", "GiB")
    line_plot(d / f"{stem}_query.png",
              {"box query, scores (ms CPU)": (x, [r["box_scores_cpu_ms"] for r in rows]),
               "full query, scores (ms CPU)": (x, [r["full_scores_cpu_ms"] for r in rows]),
               "full query, scores (ms wall)": (x, [r["full_scores_ms"] for r in rows]),
               "full query, full ranking (ms)": (x, [r["full_search_ms"] for r in rows])},
              "query time, one core", "database images", "ms")
    print(f"wrote {a.out} and {d}/{stem}_*.png")


if __name__ == "__main__":
    main()
