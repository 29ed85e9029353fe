"""The choices inside InvertedFile.scores and top_k, measured on an index kept by
bench_inverted_file.py (``--workdir DIR``): scipy's kernels against the public-API
fallback, the scoring block size, and top-100 (``top_k``) against the full ranking.

Every variant scores the same queries (box queries of the index's own word model), in
the alternating-block protocol of bench_vs_asmk.py (``time_blocks``), one thread; the
figures are medians of CPU time (``time.process_time``) per query.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scoring.py --workdir DIR \
        [--real-maps STORE]      # the same --real-maps the index was built with
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

import lib.index.inverted_file as inverted_file
from benchmarks.bench_inverted_file import RESULTS, make_generator, time_blocks
from lib.allocator import retain_freed_memory
from lib.index.inverted_file import InvertedFile, top_k
from lib.search.rankings import rank_scores

BLOCKS = (1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22)


def _with_block(ivf: InvertedFile, qs: list, block: int) -> Callable[[int], object]:
    """Scoring of query i with SCORE_BLOCK set to ``block``."""
    def f(i: int) -> np.ndarray:
        old = inverted_file.SCORE_BLOCK
        inverted_file.SCORE_BLOCK = block
        try:
            return ivf.scores(qs[i])
        finally:
            inverted_file.SCORE_BLOCK = old
    return f


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True,
                    help="a bench_inverted_file.py --workdir holding index/")
    ap.add_argument("--real-maps", type=Path, default=None)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5, help="timed blocks per variant")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    retain_freed_memory()  # as the pipeline scripts do (lib/allocator.py)
    path = a.workdir / "index"
    ivf = InvertedFile.load(path)
    if ivf.header["meta"].get("real_maps") != (str(a.real_maps) if a.real_maps else None):
        raise SystemExit(f"{path}: built from another word model; pass its --real-maps")
    saved = inverted_file.KERNEL_MAX_POSTINGS
    inverted_file.KERNEL_MAX_POSTINGS = 0  # a second reader of the same index: fallback
    public = InvertedFile.load(path)
    public._run_kernels()
    inverted_file.KERNEL_MAX_POSTINGS = saved
    assert ivf._run_kernels() is not None and public._run_kernels() is None
    qs = make_generator(a.real_maps, 0.9, 10.0, a.seed).queries(a.queries, (30, 24))
    touched = float(np.median([ivf.postings_touched(q) for q in qs]))
    calls: dict[str, Callable[[int], object]] = {
        "kernels_ms": lambda i: ivf.scores(qs[i]),
        "public_api_ms": lambda i: public.scores(qs[i])}
    out: dict = {"index": str(path), "n_docs": ivf.n_docs, "postings_touched": touched,
                 "paths": time_blocks(calls, len(qs), a.reps)}
    blocks = {f"block_{b}_ms": _with_block(ivf, qs, b) for b in BLOCKS}
    out["blocks"] = time_blocks(blocks, len(qs), a.reps)
    scores = [ivf.scores(q) for q in qs]
    out["ranking"] = time_blocks({"top_k_100_ms": lambda i: top_k(scores[i], 100),
                              "full_ranking_ms": lambda i: rank_scores(scores[i])},
                             len(qs), a.reps)
    print(json.dumps(out, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "scoring_real.json" if a.real_maps else "scoring_zipf.json"
    (RESULTS / name).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
