"""The BoW search of one encoded query: inverted file -> [spatial re-ranking] -> [query
expansion -> inverted file -> re-ranking again].

Why one class: the three stages share the query's map and box, the database assignment
store and a cache of database vectors (GQE), and their order is part of the method
(re-ranking always scores windows against the original query, so the final block is
spatially verified even after expansion).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lib.errors import SettingsError, UserError
from lib.features.scales import image_vector
from lib.index.bow import SparseVec
from lib.index.encoding import weights_of_words
from lib.search import expansion
from lib.search.geometry import cells_to_box
from lib.search.query_encoding import EncodedQuery
from lib.search.rankings import rank_scores
from lib.search.rerank import fuse, rerank


def ranking_scores(first_scores: np.ndarray, top_ids: np.ndarray | None = None,
                   top_scores: np.ndarray | None = None) -> np.ndarray:
    """Per-database-image scores (database order) whose descending order is the final
    list: the search scores, with the re-ranked images ``top_ids`` given their window
    scores lifted above every other score (``1 + max(rest) + s - min(0, min(s))``), so the
    re-ranked block comes first, sorted by window score, and the rest keeps its order."""
    out = np.asarray(first_scores, np.float32).copy()
    if top_ids is None or len(top_ids) == 0:
        return out
    top_ids = np.asarray(top_ids, np.int64)
    top = np.asarray(top_scores, np.float64)
    rest = np.delete(out, top_ids)
    lift = (float(rest.max()) if rest.size else 0.0) + 1.0
    out[top_ids] = (lift + top - min(float(top.min()), 0.0)).astype(np.float32)
    return out


@dataclass
class Ranked:
    """One query's final ranking: ``order`` (database indices, best first), ``scores``
    (database order, consistent with ``order``, see :func:`ranking_scores`), the
    localisations of the last re-ranking (or ``None``) and per-stage times in ms."""

    order: np.ndarray
    scores: np.ndarray
    localisations: list[dict] | None
    timings: dict[str, float]


class BowSearcher:
    """Search -> [spatial re-ranking of the top ``top``] -> [GQE/LQE with the top
    ``qe_top`` -> search -> re-ranking again]. Re-ranking always scores windows against
    the original query's map and box (the expanded vector has no map); after query
    expansion it re-orders the new top ``top``, so the final block is spatially verified.

    ``index`` is a :class:`lib.index.inverted_file.InvertedFile`, ``store`` the database
    :class:`lib.index.assignment_store.AssignmentStore` (needed for re-ranking and GQE)."""

    def __init__(self, settings: Any, index: Any, store: Any | None,
                 scale_stores: Sequence[tuple[float, Any]] = ()) -> None:
        self.s = settings
        self.index = index
        self.store = store
        self.scale_stores = list(scale_stores)  # (scale, store) of the extra ``scales``
        self.n_words = int(index.n_words)
        self.db_ids: list[str] = list(index.image_ids)
        self._db_vec_cache: dict[int, SparseVec] = {}
        # rerank_score = auto: the BoW windows order the top after a BoW search, and only
        # break near-ties after the selective kernel (benchmarks/README.md, "Re-ranking
        # with kernel = asmk")
        self.rerank_score = settings["rerank_score"]
        if self.rerank_score == "auto":
            self.rerank_score = "fused" if settings["kernel"] == "asmk" else "window"
        self.qe_select = settings["qe_select"]
        if self.qe_select == "auto":
            self.qe_select = "top" if settings["kernel"] == "asmk" else "verified"
        needs_store = settings["rerank"] or settings["query_expansion"] != "none"
        if needs_store and store is None:
            raise ValueError("re-ranking and query expansion need the assignment store")

    def _maps(self, ids: np.ndarray) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        words, sizes = [], []
        for i in ids.tolist():
            w, hw = self.store.get(self.db_ids[i])
            words.append(w)
            sizes.append(hw)
        return words, sizes

    def _rerank(self, eq: EncodedQuery, order: np.ndarray, scores: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, list[dict], dict[int, SparseVec],
                           dict[int, float]]:
        """Best windows of the top ``top`` and the ranking re-ordered by them
        (``rerank_score``)."""
        top = order[: min(int(self.s["top"]), order.size)]
        words, sizes = self._maps(top)
        res = self._score_windows(eq, words)
        order_by = res.scores
        if self.rerank_score == "fused":
            order_by = fuse(scores[top], res.scores, float(self.s["rerank_fusion_weight"]))
        final = ranking_scores(scores, top, order_by)
        new_order = rank_scores(final)  # the ranking folders' rule: ties in database order
        pos = {int(i): j for j, i in enumerate(top.tolist())}
        locs = []
        for rank, i in enumerate(new_order[: top.size].tolist()):
            j = pos[i]
            box = cells_to_box(tuple(int(c) for c in res.windows[j]), sizes[j],
                               words[j].shape)
            locs.append({"image": self.db_ids[i], "rank": rank + 1,
                         "score": float(res.scores[j]),
                         "box": [round(float(c), 2) for c in box]})
        windows = {int(i): res.window_vectors[pos[int(i)]] for i in top.tolist()}
        window_scores = {int(i): float(res.scores[pos[int(i)]]) for i in top.tolist()}
        return new_order, final, locs, windows, window_scores

    def _score_windows(self, eq: EncodedQuery, words: list[np.ndarray]) -> Any:
        """Best windows of candidate maps against the query (re-ranking and QE
        verification). ``rerank_weighting``: ``counts`` (the paper) or ``database`` (the
        index's own ``weighting`` on both sides). ``rerank_global`` for a query without a
        box: ``paper`` (its whole map as the box: every window, ``pyramid_levels``) or
        ``coarse`` (the windows covering at least half of a candidate, one level)."""
        weighting = "counts"
        if self.s["rerank_weighting"] == "database" and self.s["weighting"] == "centre_prior":
            weighting = "centre_prior"
        coarse = eq.cells is None and self.s["rerank_global"] == "coarse"
        return rerank(eq.words[0], eq.cells, words, self.n_words,
                      ar_threshold=float(self.s["ar_threshold"]),
                      levels=1 if coarse else int(self.s["pyramid_levels"]),
                      weighting=weighting, window_set="large" if coarse else "all")

    def _expansion_set(self, eq: EncodedQuery, tops: list[int],
                       window_scores: dict[int, float]) -> list[int]:
        """The results query expansion averages (``qe_select``): the top ``qe_top``
        (``top``, the paper), or those of them whose best-window score is at least
        ``qe_verify`` times the best one's (``verified``). The window scores are the
        re-ranking's when it scored them, else they are computed for these few images."""
        if self.qe_select == "top" or not tops:
            return tops
        ratio = float(self.s["qe_verify"])
        if not 0.0 <= ratio <= 1.0:
            raise SettingsError(f"key 'qe_verify': must lie in [0, 1], got {ratio}")
        missing = [i for i in tops if i not in window_scores]
        if missing:
            words, _ = self._maps(np.asarray(missing, np.int64))
            res = self._score_windows(eq, words)
            window_scores = {**window_scores,
                             **{i: float(v) for i, v in zip(missing, res.scores.tolist())}}
        keep = expansion.verified([window_scores[i] for i in tops], ratio)
        return [i for i, k in zip(tops, keep.tolist()) if k]

    def _db_vector(self, i: int) -> SparseVec:
        if i not in self._db_vec_cache:
            self._db_vec_cache[i] = image_vector(self.db_ids[i], self.store, self.scale_stores,
                                                 self.s["weighting"], self.n_words)
        return self._db_vec_cache[i]

    def _first_stage(self, eq: EncodedQuery) -> tuple[np.ndarray, np.ndarray]:
        """The inverted file's ranking of the query: BoW, or with kernel = asmk the
        selective match kernel on the query's signatures."""
        if self.s["kernel"] != "asmk":
            return self.index.search(eq.vector)
        if eq.asmk is None:
            raise ValueError("kernel asmk: the query was encoded without signatures")
        s = self._asmk_scores(eq.asmk[0], eq.asmk[1], eq.asmk[2])
        return rank_scores(s), s

    def _asmk_scores(self, words: np.ndarray, signatures: np.ndarray,
                     weights: np.ndarray | None) -> np.ndarray:
        """The kernel's scores (database order) of one aggregated query against the
        index's signatures, with the settings' selectivity (``asmk_sigma``, ``asmk_alpha``,
        ``asmk_tau``); ``weights``: the query's word weights (``asmk_weighting = bow``)."""
        alpha, tau = float(self.s["asmk_alpha"]), float(self.s["asmk_tau"])
        bits = int(self.index.meta["asmk_bits"])
        sigma = str(self.s["asmk_sigma"])
        if sigma == "asmk":  # the reference kernel: the index's own scorer
            return self.index.asmk_scores(words, signatures, alpha, tau, bits, weights)
        from lib.index.asmk import score_postings
        ix = self.index
        if (ix.asmk_signatures is None or ix.asmk_weights is None
                or ix.asmk_offsets is None or ix.asmk_docs is None):
            raise UserError(f"{ix.path}: this index has no ASMK signatures (built with "
                            "kernel = bow); rerun step C with kernel = asmk")
        return score_postings(words, signatures, ix.asmk_offsets, ix.asmk_docs,
                              ix.asmk_signatures, ix.asmk_weights, ix.n_docs, alpha, tau,
                              bits, per_doc=False, query_weights=weights, sigma=sigma)

    def _asmk_expand(self, first: np.ndarray, tops: list[int]
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Query expansion in the kernel's own space: the weighted mean of the query's
        scores and the scores of each expansion image's stored signatures used as a query
        (with a linear kernel, the weighted average query; ASMK has no window signatures,
        so GQE and LQE both expand with whole images). The query weighs 1, image ``i``
        ``(first[i] / max first over tops) ** qe_alpha`` (alpha-QE): a plain mean lets
        the weaker of the top images, often negatives when an object has few photos,
        pull the new ranking as hard as the best ones. An expansion image's own score
        leaves out its own vote."""
        f = np.asarray(first, np.float64)
        total = f.copy()
        alpha = float(self.s["qe_alpha"])
        ref = float(f[tops].max()) if tops else 0.0
        wts = (np.clip(f[tops] / ref, 0.0, 1.0) ** alpha if ref > 0
               else np.ones(len(tops)))
        self_votes: dict[int, float] = {}
        for i, wt in zip(tops, wts.tolist()):
            sig = self.store.get_signature(self.db_ids[i])
            if sig is None:
                raise ValueError(f"image {self.db_ids[i]!r} has no ASMK signatures")
            uw, sg = sig[0].astype(np.int64), sig[1]
            weights = None
            if self.s["asmk_weighting"] == "bow":
                weights = weights_of_words(self._db_vector(i), uw)
            si = self._asmk_scores(uw, sg, weights)
            total += wt * si
            self_votes[i] = wt * float(si[i])
        # leave one out: an expansion image does not vote for itself (its self-match
        # would lift it far above everything else and flatten the rest of the top)
        denom = np.full(f.size, 1.0 + float(wts.sum()))
        for (i, v), wt in zip(self_votes.items(), wts.tolist()):
            total[i] -= v
            denom[i] -= wt
        s = (total / denom).astype(np.float32)
        return rank_scores(s), s

    def rank(self, eq: EncodedQuery) -> Ranked:
        t: dict[str, float] = {"search": 0.0, "rerank": 0.0, "qe": 0.0}
        t0 = time.perf_counter()
        order, scores = self._first_stage(eq)
        first = scores
        t["search"] += time.perf_counter() - t0
        locs, windows, wscores = None, {}, {}
        if self.s["rerank"]:
            t0 = time.perf_counter()
            order, scores, locs, windows, wscores = self._rerank(eq, order, scores)
            t["rerank"] += time.perf_counter() - t0
        qe = self.s["query_expansion"]
        if qe != "none":
            t0 = time.perf_counter()
            n = min(int(self.s["qe_top"]), order.size)
            tops = self._expansion_set(eq, order[:n].tolist(), wscores)
            if self.s["kernel"] == "asmk":  # the expansion's search is the kernel's own
                order, scores = self._asmk_expand(first, tops)
                t["qe"] += time.perf_counter() - t0
            else:
                if qe == "gqe":
                    q2 = expansion.gqe(eq.vector, [self._db_vector(i) for i in tops])
                else:  # lqe: the best windows of the re-ranked top (within the top `top`)
                    q2 = expansion.lqe(eq.vector,
                                       [windows[i] for i in tops if i in windows])
                t["qe"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                order, scores = self.index.search(q2)
                t["search"] += time.perf_counter() - t0
            if self.s["rerank"]:
                t0 = time.perf_counter()
                order, scores, locs, _, _ = self._rerank(eq, order, scores)
                t["rerank"] += time.perf_counter() - t0
        return Ranked(order, scores, locs, {k: v * 1000.0 for k, v in t.items()})
