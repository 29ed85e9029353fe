"""Query expansion: global (GQE) and local (LQE), BLCF paper §4 / spec §6.

Why one averaging function: both variants are the same operation, "average the
L2-normalised query with the L2-normalised vectors of the top N results, then
L2-normalise" (the authors' later ``query_expansion``); they differ only in what the top
results contribute. GQE uses their full-image database vectors; LQE uses the count BoW of
each one's best re-ranking window (:class:`lib.search.rerank.RerankResult.window_vectors`), so
the background of the top images stays out of the new query. The caller searches the
whole index again with the result.

Which top results are averaged is the caller's choice: the paper takes the top N
(``qe_select = top``); :func:`verified` keeps only those whose best-window score is close
to the best one's (``qe_select = verified``), because with a few relevant images per
query most of a fixed top 10 is wrong and drags the query towards other objects
(measured in benchmarks/README.md, "Re-ranking and query expansion: what loses and the
fix").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lib.index.bow import SparseVec, l2_normalise, sparse_sum


def average_query(query: SparseVec, others: Sequence[SparseVec]) -> SparseVec:
    """L2 of the mean of the L2-normalised ``query`` and ``others`` (each vector counts
    once, whatever its own norm; empty vectors add nothing but still count in the mean,
    which the final L2 makes irrelevant)."""
    vecs = [l2_normalise(query)] + [l2_normalise(v) for v in others]
    n = len(vecs)
    return l2_normalise(sparse_sum(vecs, [1.0 / n] * n))


def gqe(query: SparseVec, top_vectors: Sequence[SparseVec]) -> SparseVec:
    """Global query expansion: ``top_vectors`` are the full-image BoW vectors of the top
    N (default 10) results of the current ranking."""
    return average_query(query, top_vectors)


def lqe(query: SparseVec, top_window_vectors: Sequence[SparseVec]) -> SparseVec:
    """Local query expansion: ``top_window_vectors`` are the BoW vectors of the best
    re-ranking windows of the top N results (needs spatial re-ranking)."""
    return average_query(query, top_window_vectors)


def verified(window_scores: Sequence[float], ratio: float) -> np.ndarray:
    """Which of the top results pass verification: those whose best-window score is at
    least ``ratio`` times the highest of ``window_scores`` (bool mask, input order). The
    best one always passes when its score is positive; when no score is positive (no
    window shares a word with the query) nothing passes and the query is not expanded.
    ``ratio`` = 0 keeps every result with a positive score."""
    s = np.asarray(window_scores, np.float64)
    if s.ndim != 1:
        raise ValueError("window_scores must be one score per result")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the verification ratio must lie in [0, 1], got {ratio}")
    if s.size == 0 or not (s.max() > 0):
        return np.zeros(s.size, bool)
    return (s > 0) & (s >= ratio * s.max())
