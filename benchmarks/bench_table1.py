"""The paper's Table 1 on a finished run: mAP and per-query time of each stage.

For GS (masking 0) and LS (masking 1) and the five stages baseline, +R, +GQE, +R+GQE and
+R+LQE, step D runs with ``--set`` overrides and step E evaluates it. Each variant gets
its own run folder ``<out>/<search>_<stage>/`` whose ``assignments.lmdb`` and ``index``
are symbolic links to the finished run (``--run``, default the settings' path_output), so
the finished run's own ``bow/`` is never touched; PCA and codebook are read from the
finished run's models folder; the query assignment maps are cached once in
``<out>/query_words.lmdb`` and shared by all variants. Steps A-C must have been run.

Prints two Markdown tables (mAP; ms per query and stage, from each ranking.json) and
writes them with the raw numbers to benchmarks/results/table1_<dataset>.json.

    nice -n 5 .venv/bin/python benchmarks/bench_table1.py settings/smvs_dvd.json
    nice -n 5 .venv/bin/python benchmarks/bench_table1.py settings/demo.json --searches 0 1

SMVS has no query boxes: LS equals GS there (masking 1 without a box uses every word),
so the default for it is GS only; ``--searches 0 1`` runs both and shows the equality.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lib.settings import load_settings

REPO = Path(__file__).resolve().parent.parent

STAGES = {  # name: (rerank, query_expansion)
    "baseline": (False, "none"),
    "+R": (True, "none"),
    "+GQE": (False, "gqe"),
    "+R+GQE": (True, "gqe"),
    "+R+LQE": (True, "lqe"),
}
SEARCH = {0: "GS", 1: "LS"}
SLUG = {"baseline": "base", "+R": "r", "+GQE": "gqe", "+R+GQE": "r_gqe", "+R+LQE": "r_lqe"}


def _link(dst: Path, src: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.resolve() != src.resolve():
            raise SystemExit(f"{dst} exists and is not a link to {src}")
        return
    dst.symlink_to(src.resolve(), target_is_directory=True)


def run_variant(settings: Path, base: Path, models: Path, features: Path, out: Path,
                cache: Path, masking: int, stage: str, extra: list[str], nice: int,
                roots: list[str]) -> dict:
    """Step D then E for one variant; its results.json and ranking.json numbers."""
    rerank, qe = STAGES[stage]
    folder = out / f"{SEARCH[masking]}_{SLUG[stage]}"
    folder.mkdir(parents=True, exist_ok=True)
    _link(folder / "assignments.lmdb", base / "assignments.lmdb")
    _link(folder / "index", base / "index")
    cache.mkdir(parents=True, exist_ok=True)
    _link(folder / "query_words.lmdb", cache)
    sets = [f"path_output={folder}", f"path_models={models}", f"path_features={features}",
            f"masking={masking}", f"rerank={json.dumps(rerank)}", f"query_expansion={qe}",
            "report=false", *extra]
    args = [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    for script in ("D_rankings_BoW.py", "E_evaluate.py"):
        cmd = ["nice", "-n", str(nice), sys.executable, str(REPO / "bow_pipeline" / script),
               str(settings), *args, *roots, "--quiet"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if r.returncode != 0:
            raise SystemExit(f"{script} failed for {folder.name}:\n{r.stderr or r.stdout}")
        print(f"  {folder.name}: {r.stdout.strip().splitlines()[-1]}", flush=True)
    res = json.loads((folder / "bow" / "results.json").read_text())
    rk = json.loads((folder / "bow" / "ranking.json").read_text())
    return {"search": SEARCH[masking], "stage": stage, "map": res["map"],
            "n_queries": res["n_queries"], "ms_per_query": rk["ms_per_query"],
            "wall_s": round(time.perf_counter() - t0, 1), "folder": str(folder)}


def tables(rows: list[dict]) -> str:
    searches = [s for s in ("GS", "LS") if any(r["search"] == s for r in rows)]
    stages = [s for s in STAGES if any(r["stage"] == s for r in rows)]
    by = {(r["search"], r["stage"]): r for r in rows}
    out = ["| search | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for s in searches:
        cells = [f"{by[s, st]['map']:.4f}" if (s, st) in by else "–" for st in stages]
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    out += ["", "ms per query (ranking.json; encode = query CNN pass or cache read):", "",
            "| search | stage | encode | vector | search | rerank | qe | total |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["ms_per_query"]
        out.append(f"| {r['search']} | {r['stage']} | " + " | ".join(
            f"{m.get(k, 0.0):.1f}" for k in ("encode", "vector", "search", "rerank", "qe",
                                               "total")) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", type=Path, nargs="?", default=REPO / "settings/smvs_dvd.json")
    p.add_argument("--run", type=Path, default=None,
                   help="finished run folder with assignments.lmdb, index/ and models/ "
                        "(default: the settings' path_output)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the variant folders go (default runs/table1_<dataset>)")
    p.add_argument("--searches", type=int, nargs="+", default=None, choices=(0, 1),
                   help="masking values: 0 = GS, 1 = LS (default: 0 1, GS only for SMVS)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--data", type=Path, default=None,
                   help="SMVS data folder (default: the settings' path_images, "
                        "../shared/data/smvs_dvd in this repository)")
    p.add_argument("--set", dest="extra", action="append", default=[],
                   help="further KEY=VALUE overrides for every variant (e.g. top=50)")
    p.add_argument("--data-root", type=Path, default=None, help="$DATA for the settings")
    p.add_argument("--runs-root", type=Path, default=None, help="$RUNS for the settings")
    p.add_argument("--nice", type=int, default=5)
    p.add_argument("--results", type=Path, default=None,
                   help="JSON written (default benchmarks/results/table1_<dataset>.json)")
    a = p.parse_args()
    roots = []
    if a.data_root:
        roots += ["--data-root", str(a.data_root.resolve())]
    if a.runs_root:
        roots += ["--runs-root", str(a.runs_root.resolve())]

    extra = list(a.extra)
    if a.data is not None:
        extra += [f"path_images={a.data.resolve()}",
                  f"path_gt={(a.data / 'gnd_smvs_dvd_all.json').resolve()}"]
    s = load_settings(a.settings, extra, data_root=a.data_root, runs_root=a.runs_root)
    base = (a.run or Path(s.path_output)).resolve()
    for need in ("assignments.lmdb", "index"):
        if not (base / need).exists():
            raise SystemExit(f"{base / need} missing: run steps A-C first")
    models = Path(s.path_models).resolve() if a.run is None else base / "models"
    features = Path(s.path_features).resolve() if a.run is None else base / "features"
    out = (a.out or REPO / "runs" / f"table1_{s.dataset}").resolve()
    searches = a.searches or ([0] if s.dataset == "smvs_dvd" else [0, 1])
    rows = []
    for m in searches:
        for st in a.stages:
            rows.append(run_variant(a.settings.resolve(), base, models, features, out,
                                    out / "query_words.lmdb", m, st, extra, a.nice, roots))
    text = tables(rows)
    res = a.results or REPO / "benchmarks" / "results" / f"table1_{s.dataset}.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps({"settings": str(a.settings), "run": str(base),
                               "extra": extra, "rows": rows, "markdown": text}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
