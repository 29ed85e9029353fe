"""Evaluation of ranked lists: the Oxford AP rule, revisited Easy/Medium/Hard with mP@k,
TRECVid shot-level AP, and :func:`evaluate`, which gives everything ``results.json`` needs.

Why this module is careful: published numbers on these benchmarks differ by tenths of a
point between AP variants (field_notes §4). We follow the Oxford ``compute_ap`` rule
exactly (spec §4.1): junk entries are skipped (they advance neither the rank nor the
recall), AP accumulates with the trapezoid rule, the previous precision starting at 1,
and images missing from a list are never retrieved. For the k-th positive (0-based) at
junk-free rank r (0-based) this is the term ``(k/r + (k+1)/(r+1)) / 2 / n_pos`` with
``k/r := 1`` at r = 0, which is how the vectorised variant computes it.

Queries without positives have no AP (NaN) and are left out of every mean, as the
revisited protocol's official code does; ``n_queries`` counts the evaluated ones and
``queries_without_positives`` names the others (with a warning), so a mean over fewer
queries than were listed is never silent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from lib.errors import UserError
from lib.groundtruth.common import GroundTruth, Query

log = logging.getLogger(__name__)

KAPPAS = (1, 5, 10)  # mP@k of the revisited protocol


# --------------------------------------------------------------------------- Oxford AP


def average_precision(ranked: Sequence[str], positives: Collection[str],
                      junk: Collection[str]) -> float:
    """AP of one ranked list by the Oxford ``compute_ap`` rule (spec §4.1), written as
    the plain walk so it can serve as the reference for the vectorised variant.
    NaN when there are no positives."""
    pos, amb = set(positives), set(junk)
    if not pos:
        return math.nan
    old_recall, old_precision, ap = 0.0, 1.0, 0.0
    hits, j = 0, 0
    for image in ranked:
        if image in amb:
            continue  # junk: does not advance the rank
        if image in pos:
            hits += 1
        recall, precision = hits / len(pos), hits / (j + 1)
        ap += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def junk_free_ranks(order: np.ndarray, pos_mask: np.ndarray,
                    junk_mask: np.ndarray) -> np.ndarray:
    """0-based ranks of the retrieved positives once junk entries are removed.

    ``order``: ranked database indices (possibly truncated); the masks are boolean over
    the database. A positive that is also junk counts as junk (the Oxford rule tests
    junk first)."""
    order = np.asarray(order, dtype=np.int64)
    keep = ~junk_mask[order]
    return np.flatnonzero(pos_mask[order[keep]])


def ap_from_ranks(ranks: np.ndarray, n_pos: int) -> float:
    """Vectorised Oxford AP from the sorted 0-based junk-free ranks of the retrieved
    positives and the number of positives in the ground truth (retrieved or not)."""
    if n_pos <= 0:
        return math.nan
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        return 0.0
    k = np.arange(r.size, dtype=np.float64)
    prev = np.divide(k, r, out=np.ones_like(r), where=r > 0)
    return float(np.sum((prev + (k + 1) / (r + 1)) / 2) / n_pos)


def precision_at_k(ranks: np.ndarray, kappas: Sequence[int] = KAPPAS) -> np.ndarray:
    """Revisited mP@k for one query, with the official quirk (field_notes §4): the
    precision at k divides by min(highest positive rank, k), not by k. ``ranks`` are the
    0-based junk-free ranks of the retrieved positives; none retrieved gives 0."""
    r1 = np.asarray(ranks, dtype=np.int64) + 1
    if r1.size == 0:
        return np.zeros(len(kappas))
    kq = np.minimum(r1.max(), np.asarray(kappas, dtype=np.int64))
    return (r1[None, :] <= kq[:, None]).sum(axis=1) / kq


def precision_recall(ranked: Sequence[str], positives: Collection[str],
                     junk: Collection[str]) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision at every non-junk position of ``ranked`` (for the plots).
    Recall divides by all positives (0 everywhere when there are none)."""
    pos, amb = set(positives), set(junk)
    kept = [i for i in ranked if i not in amb]
    hit = np.fromiter((i in pos for i in kept), dtype=bool, count=len(kept))
    cum = np.cumsum(hit, dtype=np.float64)
    return cum / max(len(pos), 1), cum / np.arange(1, hit.size + 1)


# --------------------------------------------------------------------------- TRECVid


def collapse_to_shots(order: np.ndarray, shot_codes: np.ndarray) -> np.ndarray:
    """Shot codes in ranked order, each shot at the rank of its best (first) keyframe."""
    codes = shot_codes[np.asarray(order, dtype=np.int64)]
    _, first = np.unique(codes, return_index=True)
    return codes[np.sort(first)]


def shot_average_precision(ranked_shots: np.ndarray, relevant: np.ndarray,
                           n_relevant: int) -> float:
    """Non-interpolated AP (spec §4.3): the sum over the relevant shots' 1-based ranks of
    hits-so-far / rank, divided by every relevant shot in the qrels (retrieved or not).
    ``relevant`` is a boolean mask over shot codes."""
    if n_relevant <= 0:
        return math.nan
    r = np.flatnonzero(relevant[ranked_shots]) + 1.0
    return float(np.sum(np.arange(1, r.size + 1) / r) / n_relevant)


# --------------------------------------------------------------------------- evaluate


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _jsonable(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def _mask(ids: Collection[str], index: Mapping[str, int], n: int) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    idx = [index[i] for i in ids if i in index]
    m[idx] = True
    return m


def _orders(gt: GroundTruth, rankings: Any, index: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Ranked database indices per query (the reader's, else computed from the lists)."""
    ready = getattr(rankings, "indices", None) or {}
    out = {}
    for name in rankings.queries:
        if name in ready:
            out[name] = np.asarray(ready[name], dtype=np.int64)
            continue
        lst = rankings.lists[name]
        idx = np.fromiter((index.get(i, -1) for i in lst), dtype=np.int64, count=len(lst))
        bad = np.flatnonzero(idx < 0)
        if bad.size:
            raise UserError(f"ranking list of query '{name}', line {bad[0] + 1}: unknown image "
                            f"id '{lst[bad[0]]}' (not in the database of {gt.name})")
        out[name] = idx
    return out


def _without_positives(queries: Sequence[Query], aps: Sequence[float],
                       label: str) -> list[str]:
    """Names of the queries with no AP (no positives), warned about by name: they are
    left out of the mean, which a reader of the mAP alone would not know."""
    names = [q.name for q, a in zip(queries, aps) if math.isnan(a)]
    if names:
        log.warning("%d of %d queries have no positives%s and are left out of the mean: %s",
                    len(names), len(aps), label, ", ".join(names))
    return names


def _protocol_block(orders: Mapping[str, np.ndarray], queries: Sequence[Query],
                    sets: Sequence[tuple[Collection[str], Collection[str]]],
                    index: Mapping[str, int], n_db: int, with_mp: bool,
                    label: str = "") -> dict[str, Any]:
    """mAP (and mP@k) over the queries, given (positives, junk) per query; ``label``
    names the protocol in the warning about queries without positives."""
    aps, mps = [], []
    for q, (pos, junk) in zip(queries, sets):
        n_pos = len(set(pos))
        if n_pos == 0:
            aps.append(math.nan)
            mps.append(np.full(len(KAPPAS), np.nan))
            continue
        ranks = junk_free_ranks(orders[q.name], _mask(pos, index, n_db),
                                _mask(junk, index, n_db))
        aps.append(ap_from_ranks(ranks, n_pos))
        mps.append(precision_at_k(ranks))
    block: dict[str, Any] = {
        "map": _mean(aps),
        "n_queries": int(sum(not math.isnan(a) for a in aps)),
        "per_query": {q.name: _jsonable(a) for q, a in zip(queries, aps)},
        "queries_without_positives": _without_positives(queries, aps, label),
    }
    if with_mp:
        m = np.array(mps)
        ok = ~np.isnan(m[:, 0]) if len(m) else np.zeros(0, bool)
        for j, k in enumerate(KAPPAS):
            block[f"mp@{k}"] = float(m[ok, j].mean()) if ok.any() else None
    return block


def evaluate_revisited(orders: Mapping[str, np.ndarray], queries: Sequence[Query],
                       index: Mapping[str, int], n_db: int) -> dict[str, dict[str, Any]]:
    """Easy/Medium/Hard (field_notes §4): Easy ok = easy, junk = junk ∪ hard; Medium
    ok = easy ∪ hard, junk = junk; Hard ok = hard, junk = junk ∪ easy. Each block has
    mAP, mP@1/5/10 and per-query AP; queries with no positives in a protocol are left out
    of that protocol's means."""
    for q in queries:
        if q.easy is None or q.hard is None:
            raise UserError(f"query '{q.name}' has no easy/hard judgements (not revisited "
                            "ground truth)")
    setups = {
        "easy": [(q.easy, q.junk | q.hard) for q in queries],
        "medium": [(q.easy | q.hard, q.junk) for q in queries],
        "hard": [(q.hard, q.junk | q.easy) for q in queries],
    }
    return {name: _protocol_block(orders, queries, s, index, n_db, with_mp=True,
                                  label=f" in the {name} protocol")
            for name, s in setups.items()}


def evaluate_trecvid(gt: GroundTruth, orders: Mapping[str, np.ndarray],
                     queries: Sequence[Query]) -> dict[str, Any]:
    """Shot-level AP per query image: keyframe rankings collapse to shots (best keyframe
    kept), AP divides by all relevant shots of the topic in the qrels."""
    if gt.shots is None or gt.relevant_shots is None:
        raise UserError(f"ground truth {gt.name}: trecvid protocol without keyframe shots")
    # a keyframe missing from the shot map stands for its own shot
    shot_names = [gt.shots.get(i, i) for i in gt.db_ids]
    all_shots = sorted(set(shot_names).union(*gt.relevant_shots.values()))
    code = {s: c for c, s in enumerate(all_shots)}
    shot_codes = np.array([code[s] for s in shot_names], dtype=np.int64)
    aps = []
    for q in queries:
        rel = gt.relevant_shots.get(q.name, frozenset())
        mask = np.zeros(len(all_shots), dtype=bool)
        mask[[code[s] for s in rel]] = True
        aps.append(shot_average_precision(collapse_to_shots(orders[q.name], shot_codes), mask,
                                          len(rel)))
    return {"map": _mean(aps), "n_queries": int(sum(not math.isnan(a) for a in aps)),
            "per_query": {q.name: _jsonable(a) for q, a in zip(queries, aps)},
            "queries_without_positives": _without_positives(queries, aps,
                                                            " (no relevant shot)"),
            "level": "shot"}


def _per_topic(queries: Sequence[Query], per_query: Mapping[str, float | None]) -> dict:
    groups: dict[str, list[float]] = {}
    for q in queries:
        if q.topic is not None and per_query[q.name] is not None:
            groups.setdefault(q.topic, []).append(per_query[q.name])  # type: ignore[arg-type]
    return {t: float(np.mean(v)) for t, v in groups.items()}


def evaluate(gt: GroundTruth, rankings: Any) -> dict[str, Any]:
    """Every metric ``results.json`` holds for ``rankings``
    (a :class:`lib.search.rankings.Rankings`): ``map``, ``n_queries`` (evaluated),
    ``n_queries_listed``, ``per_query`` (queries.txt order; null = no positives),
    ``queries_without_positives`` (left out of the mean), ``per_landmark`` (oxford),
    ``easy``/``medium``/``hard`` blocks (revisited; the top-level
    numbers are Medium's), ``per_topic`` and ``level: shot`` (trecvid)."""
    index = {i: n for n, i in enumerate(gt.db_ids)}
    by_name = {q.name: q for q in gt.queries}
    unknown = [n for n in rankings.queries if n not in by_name]
    if unknown:
        raise UserError(f"ranking folder: query '{unknown[0]}' is not in ground truth {gt.name}")
    queries = [by_name[n] for n in rankings.queries]
    missing = [q.name for q in gt.queries if q.name not in set(rankings.queries)]
    if missing:
        log.warning("%d ground-truth queries have no ranking (first: %s); the mean is over "
                    "the others", len(missing), missing[0])
    orders = _orders(gt, rankings, index)
    n_db = len(gt.db_ids)
    out: dict[str, Any] = {"protocol": gt.protocol, "dataset": gt.name}
    if gt.protocol == "revisited":
        blocks = evaluate_revisited(orders, queries, index, n_db)
        out.update(blocks)
        med = blocks["medium"]
        out.update(map=med["map"], n_queries=med["n_queries"], per_query=med["per_query"],
                   queries_without_positives=med["queries_without_positives"])
    elif gt.protocol == "trecvid":
        out.update(evaluate_trecvid(gt, orders, queries))
        out["per_topic"] = _per_topic(queries, out["per_query"])
    else:
        out.update(_protocol_block(orders, queries, [(q.positives, q.junk) for q in queries],
                                   index, n_db, with_mp=False))
        if gt.protocol == "oxford":
            out["per_landmark"] = _per_topic(queries, out["per_query"])
    out["n_queries_listed"] = len(queries)
    if missing:
        out["queries_without_ranking"] = missing
    return out


__all__ = ["KAPPAS", "ap_from_ranks", "average_precision", "collapse_to_shots", "evaluate",
           "evaluate_revisited", "evaluate_trecvid", "junk_free_ranks", "precision_at_k",
           "precision_recall", "shot_average_precision"]
