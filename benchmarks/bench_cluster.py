#!/usr/bin/env python
"""Benchmark of steps A and C with ``cluster`` = none vs a Dask cluster (``local:2``).

Each configuration runs step A into a fresh run folder, then step C with the PCA and
codebook of an existing run (``--models``, read only: step B is not rerun), each step
in a fresh child process, the configurations in rotation (none, local:2, none, ... when
``--rounds`` > 1). Reports wall time and throughput per step, the cluster's per-task
overhead and the driver's merge times, and checks that both configurations wrote the
same feature store, assignment store and inverted file.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cluster.py \\
        --settings settings/smvs_dvd.json --models runs/smvs_dvd/models \\
        --runs-root /tmp/blcf-bench-cluster
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench_cluster")


def child(settings: str, runs_root: str, out: str, models: str, cluster: str,
          shard_size: int, step: str) -> dict[str, Any]:
    """One step in this process; returns wall time, counts and the cluster timings."""
    import torch

    from lib.allocator import retain_freed_memory
    from lib.settings import load_settings

    retain_freed_memory()
    timings: list[dict[str, Any]] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            t = getattr(record, "cluster_timing", None)
            if t is not None:
                timings.append({k: v for k, v in t.items() if k != "per_task"}
                               | {"per_task": t.get("per_task", [])})

    logging.getLogger("blcf.cluster").addHandler(Grab())
    logging.getLogger("blcf.C").addHandler(Grab())
    logging.getLogger("blcf.cluster").setLevel(logging.INFO)
    logging.getLogger("blcf.C").setLevel(logging.INFO)
    s = load_settings(settings, runs_root=runs_root, overrides=[
        f"path_output={out}", f"path_models={models}", "TRAIN_PCA=false",
        "TRAIN_CENTROIDS=false", f"cluster={cluster}", f"shard_size={shard_size}"])
    t0 = time.perf_counter()
    if step == "A":
        from lib.features.step import extract_features

        r = extract_features(s)
    else:
        from lib.index.step import build_index

        r = build_index(s)
    wall = time.perf_counter() - t0
    return {"step": step, "cluster": cluster, "wall_s": wall, "summary": r.summary,
            "counts": {k: v for k, v in r.counts.items() if isinstance(v, (int, float, str))},
            "torch_threads": torch.get_num_threads(), "timings": timings}


def lmdb_content(path: Path) -> dict[bytes, bytes]:
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            recs = {bytes(k): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()
    meta = json.loads(recs.pop(b"__meta__", b"{}"))
    for k in ("created", "settings_hash", "versions"):
        meta.pop(k, None)
    recs[b"__meta__"] = json.dumps(meta, sort_keys=True).encode()
    return recs


def same_outputs(a: Path, b: Path) -> dict[str, bool]:
    out = {}
    fa = next((a / "features").glob("*.lmdb"))
    out["feature store"] = lmdb_content(fa) == lmdb_content(b / "features" / fa.name)
    out["assignment store"] = (lmdb_content(a / "assignments.lmdb")
                               == lmdb_content(b / "assignments.lmdb"))
    out["inverted file"] = all(
        (a / "index" / n).read_bytes() == (b / "index" / n).read_bytes()
        for n in ("offsets.npy", "docs.npy", "weights.npy", "image_ids.txt"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=str(REPO / "settings" / "smvs_dvd.json"))
    ap.add_argument("--models", required=True, help="folder with pca.npz + codebook.npy")
    ap.add_argument("--runs-root", required=True, help="scratch folder for the runs")
    ap.add_argument("--configs", nargs="+", default=["none", "local:2"])
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        out, models, cluster, shard, step, runs_root = args.child
        r = child(args.settings, runs_root, out, models, cluster, int(shard), step)
        print("RESULT " + json.dumps(r))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(args.runs_root).resolve()
    results: list[dict[str, Any]] = []
    runs: dict[str, Path] = {}
    for rnd in range(args.rounds):
        for cfg in args.configs:
            out = root / f"{cfg.replace(':', '')}-{rnd}"
            shutil.rmtree(out, ignore_errors=True)
            runs[cfg] = out
            for step in "AC":
                cmd = [sys.executable, __file__, "--settings", args.settings, "--models",
                       args.models, "--runs-root", str(root), "--child", str(out),
                       str(Path(args.models).resolve()), cfg, str(args.shard_size), step,
                       str(root)]
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                   env=dict(os.environ))
                line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")),
                            None)
                if p.returncode or line is None:
                    sys.stderr.write(p.stderr[-4000:])
                    raise SystemExit(f"{cfg} step {step} failed ({p.returncode})")
                r = json.loads(line[7:]) | {"round": rnd}
                results.append(r)
                n = r["counts"].get("extracted", r["counts"].get("assigned", 0))
                log.info("%s %s round %d: %.1f s wall, %s images, %.2f images/s", cfg, step,
                         rnd, r["wall_s"], n, n / r["wall_s"] if r["wall_s"] else 0.0)
                for t in r["timings"]:
                    log.info("    %s", {k: (round(v, 3) if isinstance(v, float) else v)
                                        for k, v in t.items() if k != "per_task"})
    same = same_outputs(runs[args.configs[0]], runs[args.configs[-1]])
    log.info("same bytes (%s vs %s): %s", args.configs[0], args.configs[-1], same)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "same": same}, indent=1))


if __name__ == "__main__":
    main()
