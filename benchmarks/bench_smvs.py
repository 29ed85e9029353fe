#!/usr/bin/env python
"""SMVS DVD covers (all-500 protocol): BoW global search against the pooling baselines.

Runs steps A-E with settings/smvs_dvd.json (steps already done with the same settings are
skipped by run_all), then D_rankings_Pooling + E for each pooling method, and prints one
table: method, mAP, ms per query (D's own timing, network pass included). Extra
``--set KEY=VALUE`` arguments go to every step (e.g. ``--set n_centers=4096``); use
``--runs-root`` to keep variants apart.

    .venv/bin/python benchmarks/bench_smvs.py                       # the shipped settings
    .venv/bin/python benchmarks/bench_smvs.py --pooling sum max gem --set masking=0

``--data`` is the folder holding ``smvs_dvd/`` (default ``../shared/data`` next to the
repository, as in CI).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "bow_pipeline"


def step(script: str, common: list[str], *extra: str) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, str(SCRIPTS / script), *common, *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(f"{script} failed with exit code {rc}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                   help="folder holding smvs_dvd/ (default: ../shared/data)")
    p.add_argument("--settings", type=Path, default=REPO / "settings" / "smvs_dvd.json")
    p.add_argument("--runs-root", type=Path, default=None, help="where $RUNS points")
    p.add_argument("--pooling", nargs="*", default=["sum", "max", "gem"],
                   help="pooling baselines to run (default: sum max gem)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="settings override for every step")
    args = p.parse_args()
    data = args.data.resolve() / "smvs_dvd"
    if not data.is_dir():
        sys.exit(f"{data}: SMVS DVD folder not found (use --data)")
    common = [str(args.settings), "-q", "--set", f"path_images={data}",
              "--set", f"path_gt={data / 'gnd_smvs_dvd_all.json'}"]
    for o in args.overrides:
        common += ["--set", o]
    if args.runs_root:
        common += ["--runs-root", str(args.runs_root)]
    from lib.settings import load_settings

    s = load_settings(args.settings, overrides=[*args.overrides, f"path_images={data}",
                                                f"path_gt={data / 'gnd_smvs_dvd_all.json'}"],
                      runs_root=args.runs_root)
    out = Path(s.path_output)
    rows = []
    times = {}
    for script in ("A_feature_extraction.py", "B_processing_clustering.py",
                   "C_bow_representation.py"):
        times[script[0]] = step(script, common)
    step("D_rankings_BoW.py", common)
    step("E_evaluate.py", common)
    rows.append(("bow", out / "bow"))
    for method in args.pooling:
        step("D_rankings_Pooling.py", common, "--set", f"pooling={method}")
        step("E_evaluate.py", common, "--ranking", f"pooling_{method}")
        rows.append((f"pooling {method}", out / f"pooling_{method}"))
    print("\nstep times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"{'method':<14} {'mAP':>7} {'ms/query':>9}")
    for name, folder in rows:
        res = json.loads((folder / "results.json").read_text())
        rk = json.loads((folder / "ranking.json").read_text())
        print(f"{name:<14} {100 * res['map']:7.2f} {rk['ms_per_query']['total']:9.1f}")


if __name__ == "__main__":
    main()
