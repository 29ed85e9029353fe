"""Ranking folders: the hand-off from step D to step E (DESIGN.md "Ranking folder").

Layout: ``queries.txt`` (one query name per line, ground-truth order), ``lists/<query>.txt``
(every database id, best first; query names may contain ``/``), ``scores.npy`` (float32,
n_queries x n_db, database order), ``ranking.json`` (settings, provenance, timings) and,
with re-ranking, ``localisations.json``.

Why the folder is written whole and atomically: E trusts that every list belongs to the
same run; a killed D must leave either the previous folder or none, never a mix.
Why reading validates every line: an unknown id, a duplicate or a missing list silently
changes AP (a truncated list lowers it), so each is an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from lib.artefacts import atomic_path, json_default, load_npy, read_json
from lib.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Rankings:
    """A ranking folder read back: query names in order, each query's list of image ids
    (best first), ``ranking.json`` and the optional localisations. ``indices`` holds the
    same lists as database indices (filled by :func:`read_ranking_folder`) so evaluation
    need not look the ids up again."""

    queries: list[str]
    lists: dict[str, list[str]]
    meta: dict
    localisations: dict | None = None
    indices: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


def rank_scores(scores: np.ndarray) -> np.ndarray:
    """Database indices by descending score, ties in database order (stable sort); a 2-D
    array is ranked row by row."""
    s = np.asarray(scores)
    if s.ndim == 2:
        return np.stack([_rank_1d(row) for row in s]) if len(s) else s.astype(np.int64)
    return _rank_1d(s)


def _rank_1d(s: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties by index (= database order).

    For non-negative float32 scores (every BoW score) the bit pattern is monotonic, so
    a two-pass LSD radix sort of ``~bits`` (numpy's stable argsort is a radix sort for
    16-bit keys: low half first, then high half) gives the stable order ~2x faster than
    the sorted uint64 keys used before and ~2.5x faster than a stable argsort; other
    input falls back to the stable argsort."""
    s = np.asarray(s)
    n = s.size
    if s.dtype != np.float32 or n < 2048 or not s.min() >= 0:  # small: one argsort wins
        return np.argsort(-s, kind="stable").astype(np.int64)
    key = ~(s + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into +0.0
    order = np.argsort((key & 0xFFFF).astype(np.uint16), kind="stable")
    high = (key >> 16).astype(np.uint16)[order]
    return order[np.argsort(high, kind="stable")].astype(np.int64)


def _check_query_name(name: str) -> None:
    p = PurePosixPath(name)
    if (not name or "\n" in name or "\\" in name or p.is_absolute()
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise ValueError(f"query name {name!r} cannot name a list file")


def write_ranking_folder(out_dir: Path, query_names: list[str], db_ids: list[str],
                         scores: np.ndarray, orders: np.ndarray, meta: dict,
                         localisations: dict | None = None) -> None:
    """Write a complete ranking folder at ``out_dir``, replacing any previous one.

    ``scores``: float32 (n_queries, n_db) in database order; ``orders``: (n_queries, m)
    ranked database indices, normally m = n_db. Built in a temporary sibling folder and
    renamed into place, so an interrupted run leaves no half-written folder."""
    out_dir = Path(out_dir)
    scores = np.asarray(scores, dtype=np.float32)
    orders = np.asarray(orders)
    nq, nd = len(query_names), len(db_ids)
    if scores.shape != (nq, nd):
        raise ValueError(f"scores shape {scores.shape} != ({nq}, {nd})")
    if orders.ndim != 2 or orders.shape[0] != nq or orders.shape[1] > nd:
        raise ValueError(f"orders shape {orders.shape} does not fit ({nq}, {nd})")
    if orders.size and (orders.min() < 0 or orders.max() >= nd):
        raise ValueError("orders hold indices outside the database")
    if len(set(query_names)) != nq:
        raise ValueError("duplicate query names")
    for n in query_names:
        _check_query_name(n)
    ids = np.asarray(db_ids, dtype=object)
    with atomic_path(out_dir) as tmp:
        (tmp / "lists").mkdir(parents=True)
        (tmp / "queries.txt").write_text("".join(n + "\n" for n in query_names),
                                         encoding="utf-8")
        for name, order in zip(query_names, orders):
            f = tmp / "lists" / f"{name}.txt"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("\n".join(ids[order].tolist()) + "\n", encoding="utf-8")
        with open(tmp / "scores.npy", "wb") as fh:
            np.save(fh, scores, allow_pickle=False)
        (tmp / "ranking.json").write_text(
            json.dumps(meta, indent=2, sort_keys=True, default=json_default) + "\n",
            encoding="utf-8")
        if localisations is not None:
            (tmp / "localisations.json").write_text(
                json.dumps(localisations, indent=1, default=json_default) + "\n",
                encoding="utf-8")
        _fsync_tree(tmp)
    log.info("wrote %d ranked lists to %s", nq, out_dir)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def read_ranking_folder(path: Path, db_ids: Sequence[str]) -> Rankings:
    """Read and validate a ranking folder against the database ids.

    Raises UserError (file and line named) for a missing folder, queries.txt or list, an
    unknown image id, or an id listed twice. Lists may be shorter than the database:
    the missing images count as never retrieved."""
    path = Path(path)
    qfile = path / "queries.txt"
    if not qfile.is_file():
        raise UserError(f"{path}: not a ranking folder (no queries.txt)")
    queries = [ln for ln in qfile.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not queries:
        raise UserError(f"{qfile}: no queries listed")
    seen: set[str] = set()
    for n, q in enumerate(queries, 1):
        if q in seen:
            raise UserError(f"{qfile}, line {n}: query '{q}' listed twice")
        seen.add(q)
    index = {i: n for n, i in enumerate(db_ids)}
    get = index.get
    lists: dict[str, list[str]] = {}
    indices: dict[str, np.ndarray] = {}
    for q in queries:
        f = path / "lists" / f"{q}.txt"
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UserError(f"{f}: ranked list of query '{q}' is missing") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{f}: not UTF-8 text ({e})") from None
        while lines and not lines[-1].strip():
            lines.pop()
        idx = np.fromiter(map(get, lines, [-1] * len(lines)), dtype=np.int64,
                          count=len(lines))
        bad = np.flatnonzero(idx < 0)
        if bad.size:
            b = int(bad[0])
            raise UserError(f"{f}, line {b + 1} (query '{q}'): unknown image id "
                            f"{lines[b]!r}")
        counts = np.bincount(idx, minlength=len(index))
        dup = np.flatnonzero(counts > 1)
        if dup.size:
            second = int(np.flatnonzero(idx == dup[0])[1])
            raise UserError(f"{f}, line {second + 1} (query '{q}'): image id "
                            f"'{lines[second]}' listed twice")
        if len(lines) < len(index):
            log.warning("%s: %d of %d database images missing (counted as never retrieved)",
                        f, len(index) - len(lines), len(index))
        lists[q] = lines
        indices[q] = idx
    meta: dict[str, Any] = {}
    if (path / "ranking.json").is_file():
        meta = read_json(path / "ranking.json", "ranking metadata")
    else:
        log.warning("%s: no ranking.json; the settings that made the lists are unknown", path)
    locs = None
    if (path / "localisations.json").is_file():
        locs = read_json(path / "localisations.json", "localisations")
    return Rankings(queries, lists, meta, locs, indices)


def read_scores(path: Path, mmap: bool = True) -> np.ndarray:
    """``scores.npy`` of a ranking folder (memory-mapped by default)."""
    return load_npy(Path(path) / "scores.npy", mmap=mmap)


__all__ = ["Rankings", "rank_scores", "read_ranking_folder", "read_scores",
           "write_ranking_folder"]
