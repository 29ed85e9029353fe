"""Spatial re-ranking with object localisation (BLCF paper §4, spec §6).

For each of the top T candidates of a ranking, windows slide over the candidate's stored
assignment map; each window's count BoW is compared with the query box's BoW (plus a
two-level spatial pyramid), the best window gives the image its new score and the object
its localisation. No CNN pass is needed: everything comes from the assignment maps.

Window geometry (the paper leaves the rounding open; this is the rule used here):

* Every window edge lies on the **lattice** ``b_k = floor(k * side / 8 + 1/2)``,
  ``k = 0..8``, of each map side (rounding half up). A window of size ``side / m``
  (``m`` = 1, 2, 4) spans ``8 / m`` lattice steps and slides by half of that, ``4 / m``
  steps: exactly 50 % overlap in lattice units. On a 42-cell side the lattice is
  0, 5, 11, 16, 21, 26, 32, 37, 42, so the quarter windows are 10 or 11 cells high
  (42 / 4 = 10.5) and the half windows 21. The last window of every size ends on the far
  edge, so no border strip is left uncovered, and no extra window is added.
* 3 heights x 3 widths give 1 + 3 + 7 = 11 positions per axis, 121 windows per map.
  On sides shorter than 8 cells some lattice steps are empty: empty windows are never
  chosen, and equal windows get equal scores (the first in the order below wins).
* Order: full-height windows first, then H/2, then H/4 (and the same for widths inside
  each height), then top-to-bottom, left-to-right. ``argmax`` keeps the first of equal
  scores, so ties go to the larger window.
* Quadrants: a window's halves are its own lattice halves (4, 2 or 1 steps). The query
  box (in query map cells) is split at ``start + ceil(size / 2)`` on each axis, the same
  round-half-up rule; a box one cell high or wide has empty halves, whose cosines are 0.

Scoring: the aspect-ratio filter keeps windows with
``min(AR_w, AR_q) / max(AR_w, AR_q) >= ar_threshold`` (both ``width / height`` in map
cells: AR_q on the query map, AR_w on the candidate map); when no window survives, the
full map is used. Each kept window's score is the weighted sum of cosines (counts BoW,
L2) of the window with the query box (weight 1/2) and of each window quadrant with the
matching query quadrant (weight 1), divided by the sum of the weights (4.5), so scores lie
in [0, 1] for any number of levels. ``levels = 1`` is the window cosine alone.

Cell weights (``weighting``): ``counts`` is the paper's rule, every cell adds 1 to its
word in the window and query-box histograms. ``centre_prior`` weights each candidate
cell by the centre prior of its whole map (:func:`lib.index.bow.centre_prior`), so the
full-map window is exactly the database vector the first search scored, and each query
cell by the centre prior of the query box (of the whole map in GS); quadrants keep the
weights of their cells. Why: with counts on both sides, the clutter around the object in
a GS query matches the clutter of every candidate window; on the SMVS phone photos this
turned a 0.462 first search into 0.359 after re-ranking, against 0.482 with the weights
(benchmarks/README.md, "Re-ranking and query expansion: what loses and the fix").

Window sets (``window_set``): ``all`` is the paper's 121 windows; ``large`` keeps the 7
that span at least half of the lattice blocks (the full map, the 3 half-height and the 3
half-width windows), used for queries without a box (``rerank_global = coarse``), whose
layout is the photo's rather than the object's, so small windows only collect chance
matches. The aspect-ratio filter and the full-map fallback apply to either set.

Vectorisation (no loop over windows x words): cells are grouped into the 8 x 8 lattice
blocks. A window's dot product with a query vector is the sum over its blocks of the
per-block sums of the query weight of each cell's word. Its squared norm is
``sum_u n_u(R)^2 = sum_{b, b' in R} G[b, b']`` with ``G = Hb Hb^T`` the Gram matrix of
the block histograms, built from the pairs of block entries that share a word (a few
hundred per map) and folded by unordered row / column pairs (36 x 36 classes); for all
19 x 19 row x column lattice intervals at once this is two small matrix products. The
candidates are scored in batches of ``CHUNK`` maps of one shape.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lib.index.bow import EMPTY, SparseVec, centre_prior

log = logging.getLogger(__name__)

LATTICE = 8  # lattice steps per side; window sizes are 8, 4 and 2 steps
_LEVEL_STEPS = (8, 4, 2)  # full, half, quarter side
N_WINDOWS = 121
# maps scored per batch: small enough that the per-entry temporaries (~1k entries per
# map) stay in cache and below malloc's mmap threshold (no page faults per call)
CHUNK = 16


def _lattice_intervals() -> tuple[np.ndarray, np.ndarray]:
    """The lattice intervals ``[a, b)`` windows and their halves use along one axis (19:
    11 window spans and 8 single steps), and a (9, 9) id lookup."""
    spans = set()
    for m in _LEVEL_STEPS:
        for a in range(0, LATTICE - m + 1, m // 2):
            spans |= {(a, a + m), (a, a + m // 2), (a + m // 2, a + m)}
    pairs = sorted(spans)
    ids = np.full((LATTICE + 1, LATTICE + 1), -1, np.int64)
    for i, (a, b) in enumerate(pairs):
        ids[a, b] = i
    return np.array(pairs, np.int64), ids


_INTERVALS, _INTERVAL_ID = _lattice_intervals()
# indicator of the blocks each interval covers, and of the block pairs (for the norms)
_U = ((np.arange(LATTICE)[None, :] >= _INTERVALS[:, :1])
      & (np.arange(LATTICE)[None, :] < _INTERVALS[:, 1:])).astype(np.float64)
# unordered block-row (or column) pairs r1 <= r2: 36 classes; _UUF[I, p] = [r1, r2 in I]
_FOLD = np.zeros((LATTICE, LATTICE), np.int64)
_FOLD[np.triu_indices(LATTICE)] = np.arange(LATTICE * (LATTICE + 1) // 2)
_FOLD = np.maximum(_FOLD, _FOLD.T)
_N_FOLD = LATTICE * (LATTICE + 1) // 2
_r1, _r2 = np.triu_indices(LATTICE)
_UUF = _U[:, _r1] * _U[:, _r2]  # (19, 36)
# folded class (row pair * 36 + column pair) of block pair (b, b'), flattened b * 64 + b'
_bb = np.arange(LATTICE * LATTICE)
_PAIR_KEY = (_FOLD[(_bb // LATTICE)[:, None], (_bb // LATTICE)[None, :]] * _N_FOLD
             + _FOLD[(_bb % LATTICE)[:, None], (_bb % LATTICE)[None, :]]).ravel()


def _axis_windows() -> list[tuple[int, int]]:
    """Lattice intervals of the windows along one axis, in grid order (11 of them)."""
    out = []
    for m in _LEVEL_STEPS:
        out += [(a, a + m) for a in range(0, LATTICE - m + 1, m // 2)]
    return out


def _window_table() -> dict[str, np.ndarray]:
    """Per window (121): interval ids of its rows/columns and of its halves."""
    axis = _axis_windows()
    level = {}
    for m in _LEVEL_STEPS:
        level[m] = [(a, b) for a, b in axis if b - a == m]
    rows, cols = [], []
    for mh in _LEVEL_STEPS:
        for mw in _LEVEL_STEPS:
            for r in level[mh]:
                for c in level[mw]:
                    rows.append(r)
                    cols.append(c)
    r = np.array(rows)
    c = np.array(cols)
    rm = (r[:, 0] + r[:, 1]) // 2
    cm = (c[:, 0] + c[:, 1]) // 2
    iid = _INTERVAL_ID
    return {
        "r": r, "c": c,
        "I": iid[r[:, 0], r[:, 1]], "J": iid[c[:, 0], c[:, 1]],
        "It": iid[r[:, 0], rm], "Ib": iid[rm, r[:, 1]],
        "Jl": iid[c[:, 0], cm], "Jr": iid[cm, c[:, 1]],
    }


_WIN = _window_table()
assert len(_WIN["I"]) == N_WINDOWS
# windows covering at least half of the map (in lattice steps): the full map and the
# half-height and half-width windows, 1 + 3 + 3 = 7 (``windows = "large"``)
_LARGE = ((_WIN["r"][:, 1] - _WIN["r"][:, 0]) * (_WIN["c"][:, 1] - _WIN["c"][:, 0])
          >= LATTICE * LATTICE // 2)
WINDOW_SETS = ("all", "large")


def lattice(side: int) -> np.ndarray:
    """The 9 lattice positions ``floor(k * side / 8 + 1/2)`` of a map side (exact in
    floating point: ``k * side / 8`` is a multiple of 1/8)."""
    return np.floor(np.arange(LATTICE + 1) * side / LATTICE + 0.5).astype(np.int64)


def _cell_windows(h: int, w: int) -> np.ndarray:
    """All 121 windows of an h x w map in cells (r0, c0, r1, c1), empty ones included."""
    rb, cb = lattice(h), lattice(w)
    r, c = _WIN["r"], _WIN["c"]
    return np.stack([rb[r[:, 0]], cb[c[:, 0]], rb[r[:, 1]], cb[c[:, 1]]], axis=1)


def window_grid(h: int, w: int) -> np.ndarray:
    """The sliding windows of an ``h`` x ``w`` map, (n, 4) int64 ``(r0, c0, r1, c1)``, end
    exclusive, in scoring order, empty and repeated windows removed (see module doc)."""
    if h < 1 or w < 1:
        raise ValueError(f"map size must be positive, got {h}x{w}")
    win = _cell_windows(h, w)
    ok = (win[:, 2] > win[:, 0]) & (win[:, 3] > win[:, 1])
    win = win[ok]
    _, first = np.unique(win, axis=0, return_index=True)
    return win[np.sort(first)]


def aspect_similarity(ar_a: np.ndarray | float, ar_b: np.ndarray | float) -> np.ndarray:
    """``min / max`` of two aspect ratios (1 = same shape)."""
    a, b = np.asarray(ar_a, np.float64), np.asarray(ar_b, np.float64)
    return np.minimum(a, b) / np.maximum(a, b)


def ar_mask(windows: np.ndarray, ar_query: float, ar_threshold: float) -> np.ndarray:
    """Which windows pass the aspect-ratio filter (``s >= ar_threshold``)."""
    hgt = windows[:, 2] - windows[:, 0]
    wid = windows[:, 3] - windows[:, 1]
    ok = (hgt > 0) & (wid > 0)
    ar_w = wid / np.maximum(hgt, 1)
    return ok & (aspect_similarity(ar_w, ar_query) >= ar_threshold)


@dataclass
class RerankResult:
    """Per candidate (in the order given): best window score, best window in its own map
    cells ``(r0, c0, r1, c1)``, and that window's L2 BoW (for LQE: counts, or with
    ``weighting = centre_prior`` the sums of its cells' centre-prior weights)."""

    scores: np.ndarray  # (T,) float32
    windows: np.ndarray  # (T, 4) int64
    window_vectors: list[SparseVec]


def _query_regions(h: int, w: int, cells: tuple[int, int, int, int] | None,
                   levels: int) -> list[tuple[int, int, int, int]]:
    """The query box and (levels = 2) its quadrants tl, tr, bl, br, in query map cells."""
    r0, c0, r1, c1 = (0, 0, h, w) if cells is None else (int(v) for v in cells)
    if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
        raise ValueError(f"query cells {(r0, c0, r1, c1)} do not lie inside the {h}x{w} map")
    out = [(r0, c0, r1, c1)]
    if levels == 2:
        rm = r0 + (r1 - r0 + 1) // 2
        cm = c0 + (c1 - c0 + 1) // 2
        out += [(r0, c0, rm, cm), (r0, cm, rm, c1), (rm, c0, r1, cm), (rm, cm, r1, c1)]
    return out


_HEAVY = 8  # words spread over more blocks of a map than this go through a dense product


@dataclass
class _Entries:
    """The block histograms of T maps as sparse entries, sorted by (word, map, block):
    ``t``, ``w``, ``b`` (block 0..63 = row block * 8 + column block) and ``cnt``; plus the
    (map, word) groups: ``gs`` first entry, ``gn`` number of entries, ``ge`` group of
    each entry."""

    t: np.ndarray
    w: np.ndarray
    b: np.ndarray
    cnt: np.ndarray
    gs: np.ndarray
    gn: np.ndarray
    ge: np.ndarray


def _entries(words: np.ndarray, blk: np.ndarray,
             cell_weights: np.ndarray | None = None) -> _Entries:
    """Group the cells of T maps (T, n) by (word, map, block) without a comparison sort:
    cells are laid out map by map in block order, then one stable radix argsort on the
    word ids (16 bits for K <= 65,536) makes every (word, map) group contiguous with its
    cells in block order. ``cnt`` is the number of cells of each entry, or with
    ``cell_weights`` ((n,), the same for every map, or (T, n), one row per map) the sum
    of their weights."""
    n = words.shape[1]
    perm = np.argsort(blk, kind="stable")
    bsorted = blk[perm].astype(np.int32)
    wp = words[:, perm].ravel()
    wkey = wp.astype(np.uint16) if int(wp.max(initial=0)) < 65536 else wp
    o = np.argsort(wkey, kind="stable")
    ws, ts, bs = wp[o], (o // n).astype(np.int32), bsorted[o % n]
    newg = np.empty(o.size, bool)
    newg[0] = True
    newg[1:] = (ws[1:] != ws[:-1]) | (ts[1:] != ts[:-1])
    newe = newg.copy()
    newe[1:] |= bs[1:] != bs[:-1]
    es = np.flatnonzero(newe)
    if cell_weights is None:
        cnt = np.diff(np.r_[es, o.size]).astype(np.float64)
    else:
        cw = np.asarray(cell_weights, np.float64)
        wts = cw[perm][o % n] if cw.ndim == 1 else cw[:, perm].ravel()[o]
        cnt = np.add.reduceat(wts, es) if es.size else np.zeros(0)
    ge = np.cumsum(newg)[es] - 1
    gs = np.flatnonzero(np.r_[True, ge[1:] != ge[:-1]])
    gn = np.diff(np.r_[gs, es.size])
    return _Entries(ts[es], ws[es], bs[es], cnt, gs, gn, ge)


def _norms(en: _Entries, T: int) -> np.ndarray:
    """(T, 19, 19) squared norms ``sum_u n_u(R)^2`` of every row x column lattice-interval
    region R of each map.

    ``n_u(R)^2`` summed over words is the sum over ordered pairs of block entries of the
    same (map, word) inside R of ``count * count``. A pair's membership depends only on
    the unordered row pair and the unordered column pair of its two blocks, so pairs are
    binned into 36 x 36 classes per map (the folded Gram matrix of the block histograms)
    and two small matrix products give every region. Words spread over more than _HEAVY
    blocks skip the pair list: their 8 x 8 block histograms go through ``(U H U^T)^2``.
    Work ~ number of pairs, not K; the temporaries stay near a megabyte."""
    nf = _N_FOLD
    size = T * nf * nf
    nge = en.gn[en.ge]
    light = nge <= _HEAVY
    nb = LATTICE * LATTICE
    base = en.t.astype(np.int64) * (nf * nf)
    e = np.flatnonzero(light)
    keys = [base[e] + _PAIR_KEY[en.b[e] * (nb + 1)]]
    wts = [en.cnt[e] * en.cnt[e]]
    pos = np.arange(en.t.size) - en.gs[en.ge]
    e = np.flatnonzero(light & (nge > 1))
    reps = nge[e] - 1 - pos[e]  # partners after e in its group
    if e.size:
        ee = np.repeat(e, reps)
        ff = ee + 1 + np.arange(ee.size) - np.repeat(np.cumsum(reps) - reps, reps)
        keys.append(base[ee] + _PAIR_KEY[en.b[ee] * nb + en.b[ff]])
        wts.append(2.0 * en.cnt[ee] * en.cnt[ff])  # both orders of the pair
    g = np.bincount(np.concatenate(keys), weights=np.concatenate(wts), minlength=size)
    g = (g.reshape(T * nf, nf) @ _UUF.T).reshape(T, nf, -1)  # columns folded -> intervals
    norms = np.matmul(_UUF, g)  # (T, 19, 19)
    hg = np.flatnonzero(en.gn > _HEAVY)
    if hg.size:
        n_h = en.gn[hg]
        idx = np.repeat(en.gs[hg], n_h) + np.arange(n_h.sum()) - np.repeat(
            np.cumsum(n_h) - n_h, n_h)
        dense = np.zeros((hg.size, nb))
        dense[np.repeat(np.arange(hg.size), n_h), en.b[idx]] = en.cnt[idx]
        dense = dense.reshape(hg.size, LATTICE, LATTICE)
        per_word = np.matmul(np.matmul(_U, dense), _U.T)  # (heavy words, 19, 19)
        norms += np.bincount(
            np.repeat(en.t[en.gs[hg]].astype(np.int64), per_word[0].size) * per_word[0].size
            + np.tile(np.arange(per_word[0].size), hg.size),
            weights=(per_word * per_word).ravel(), minlength=norms.size).reshape(norms.shape)
    return norms


def _window_vectors(en: _Entries, T: int, best: np.ndarray) -> list[SparseVec]:
    """L2 BoW (summed entry weights) of each map's best window (lattice window index ``best``): the
    window is a union of blocks, so sum the entries inside it per (map, word)."""
    r, c = _WIN["r"][best], _WIN["c"][best]
    steps = np.arange(LATTICE)
    rows = (steps >= r[:, :1]) & (steps < r[:, 1:])  # (T, 8) block rows of the window
    cols = (steps >= c[:, :1]) & (steps < c[:, 1:])
    blocks = (rows[:, :, None] & cols[:, None, :]).ravel()  # (T * 64,)
    t = en.t
    k = np.flatnonzero(blocks[t.astype(np.int64) * (LATTICE * LATTICE) + en.b])
    gk = en.ge[k]
    seg = np.flatnonzero(np.r_[True, gk[1:] != gk[:-1]])
    val = np.add.reduceat(en.cnt[k], seg) if k.size else np.zeros(0)
    wid, tid = en.w[k[seg]].astype(np.int32), t[k[seg]]
    by_t = np.argsort(tid.astype(np.uint8) if T <= 256 else tid, kind="stable")
    wid, tid, val = wid[by_t], tid[by_t], val[by_t]  # map by map, words ascending
    nz = val > 0  # cells of weight 0 (the centre prior's far corner) add no word
    wid, tid, val = wid[nz], tid[nz], val[nz]
    sq = np.bincount(tid, weights=val * val, minlength=T)
    val = (val / np.sqrt(sq[tid])).astype(np.float32)
    bounds = np.searchsorted(tid, np.arange(T + 1))
    return [(wid[a:b], val[a:b]) for a, b in itertools.pairwise(bounds.tolist())]


def _prepare(words: np.ndarray, weighting: str = "counts", n_words: int | None = None
             ) -> tuple[_Entries, int]:
    """Entries of T maps of one shape (T, h, w); ``weighting`` = counts (the paper's
    window BoW) or centre_prior (each cell weighted as in the database vector). Cells
    holding ``n_words`` (no word: dropped by ``keep_cells``) weigh 0: their entries
    add nothing to any window's dot product or norm."""
    T, h, w = words.shape
    rb, cb = lattice(h), lattice(w)
    rblk = np.searchsorted(rb, np.arange(h), side="right") - 1
    cblk = np.searchsorted(cb, np.arange(w), side="right") - 1
    blk = (rblk[:, None] * LATTICE + cblk[None, :]).ravel()
    flat = words.reshape(T, h * w).astype(np.int64, copy=False)
    cw = None if weighting == "counts" else centre_prior(h, w).ravel()
    if n_words is not None and (dropped := flat == n_words).any():
        cw = (np.ones(h * w) if cw is None else cw)[None, :] * ~dropped
    return _entries(flat, blk, cw), T


def _all_scores(en: _Entries, T: int, qdense: np.ndarray, qnorm: np.ndarray,
                levels: int) -> np.ndarray:
    """(T, 121) pyramid scores of every lattice window (empty windows score 0)."""
    nb = LATTICE * LATTICE
    nq = qdense.shape[0]
    # per-block sums of each query region's weight of the entries' words: (T, 8, 8*nq);
    # only entries of words in the query box count (every quadrant lies inside the box)
    sel = np.flatnonzero(qdense[0][en.w] > 0)
    key = en.t[sel].astype(np.int64) * nb + en.b[sel]
    wsel, csel = en.w[sel], en.cnt[sel]
    dsum = np.stack([np.bincount(key, weights=csel * qdense[k][wsel], minlength=T * nb)
                     for k in range(nq)], axis=-1).reshape(T, LATTICE, LATTICE * nq)
    # dot of every interval x interval region with every query region: (T, 19, 19, nq)
    rows = (_U @ dsum).reshape(T, len(_INTERVALS), LATTICE, nq)
    dots = np.matmul(_U, rows.transpose(0, 3, 2, 1).reshape(T * nq, LATTICE, -1))
    dots = dots.reshape(T, nq, len(_INTERVALS), len(_INTERVALS)).transpose(0, 3, 2, 1)
    # squared norm of every interval x interval region: (T, 19, 19)
    norms = _norms(en, T)

    def cos(ii: np.ndarray, jj: np.ndarray, k: int) -> np.ndarray:
        d = dots[:, ii, jj, k]
        nn = np.sqrt(norms[:, ii, jj]) * qnorm[k]
        return np.divide(d, nn, out=np.zeros_like(d), where=nn > 0)

    W = _WIN
    if levels == 2:
        return (0.5 * cos(W["I"], W["J"], 0) + cos(W["It"], W["Jl"], 1)
                + cos(W["It"], W["Jr"], 2) + cos(W["Ib"], W["Jl"], 3)
                + cos(W["Ib"], W["Jr"], 4)) / 4.5
    return cos(W["I"], W["J"], 0)


def _query_side(query_words: np.ndarray, query_cells: tuple[int, int, int, int] | None,
                n_words: int, levels: int, weighting: str = "counts"
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """Dense histograms (nq, K + 1) of the query box (and its quadrants), their norms and
    the box's aspect ratio (width / height in query map cells). ``counts``: each cell
    counts 1; ``centre_prior``: each cell of the box counts its weight in the centre
    prior of the box itself (the whole map without a box), and the quadrants keep those
    weights. Column K, the "no word" of cells dropped by ``keep_cells`` (on either
    side), is always 0."""
    _check_weighting(weighting)
    qw = np.asarray(query_words)
    if qw.ndim != 2:
        raise ValueError(f"query_words must be an (h, w) map, got shape {qw.shape}")
    if qw.size and (qw.min() < 0 or qw.max() > n_words):
        raise ValueError(f"query word ids must lie in [0, {n_words}) or be {n_words} "
                         "(no word)")
    regions = _query_regions(qw.shape[0], qw.shape[1], query_cells, levels)
    b0, d0, b1, d1 = regions[0]
    cell_w = np.zeros(qw.shape, np.float64)
    cell_w[b0:b1, d0:d1] = 1.0 if weighting == "counts" else centre_prior(b1 - b0, d1 - d0)
    cell_w[qw == n_words] = 0.0
    qdense = np.zeros((len(regions), n_words + 1), np.float64)
    for k, (r0, c0, r1, c1) in enumerate(regions):
        sub = qw[r0:r1, c0:c1].ravel().astype(np.int64)
        if sub.size:
            qdense[k] = np.bincount(sub, weights=cell_w[r0:r1, c0:c1].ravel(),
                                    minlength=n_words + 1)
    return qdense, np.sqrt((qdense * qdense).sum(axis=1)), (d1 - d0) / (b1 - b0)


WEIGHTINGS = ("counts", "centre_prior")


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def window_scores(query_words: np.ndarray, query_cells: tuple[int, int, int, int] | None,
                  candidate: np.ndarray, n_words: int, levels: int = 2,
                  weighting: str = "counts") -> tuple[np.ndarray, np.ndarray]:
    """Every window of one candidate map and its score, before the aspect-ratio filter:
    ``(windows (121, 4), scores (121,))`` in scoring order (empty windows included, score
    0). For inspection and tests; :func:`rerank` is the batched path."""
    qdense, qnorm, _ = _query_side(query_words, query_cells, n_words, levels, weighting)
    m = np.asarray(candidate)
    en, T = _prepare(m[None], weighting, n_words)
    return _cell_windows(*m.shape), _all_scores(en, T, qdense, qnorm, levels)[0]


def rerank(query_words: np.ndarray, query_cells: tuple[int, int, int, int] | None,
           candidates: Sequence[np.ndarray], n_words: int, ar_threshold: float = 0.4,
           levels: int = 2, weighting: str = "counts", window_set: str = "all"
           ) -> RerankResult:
    """Score every candidate assignment map by its best window against the query box.

    ``query_words`` is the query's (h, w) assignment map, ``query_cells`` its box in those
    cells (``None`` = the whole map, global search), ``candidates`` the (H, W) maps of the
    top results (portrait and landscape may mix). ``weighting``: ``counts`` (the paper)
    or ``centre_prior`` (see the module doc). ``window_set``: ``all`` (the paper's 121
    windows) or ``large`` (the 7 covering at least half of the map: the full map, the
    half-height and the half-width windows). See the module doc for the rules."""
    _check_weighting(weighting)
    if window_set not in WINDOW_SETS:
        raise ValueError(f"window_set must be one of {WINDOW_SETS}, got {window_set!r}")
    if levels not in (1, 2):
        raise ValueError(f"levels must be 1 or 2, got {levels}")
    qdense, qnorm, ar_query = _query_side(query_words, query_cells, n_words, levels,
                                          weighting)
    T = len(candidates)
    scores = np.zeros(T, np.float32)
    windows = np.zeros((T, 4), np.int64)
    maps = [np.asarray(m) for m in candidates]
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(maps):
        if m.ndim != 2 or m.size == 0:
            raise ValueError(f"candidate {i}: expected a non-empty (H, W) map, got {m.shape}")
        by_shape.setdefault(m.shape, []).append(i)
    vectors: list[SparseVec] = [EMPTY] * T
    chunks = [(shape, ids[k:k + CHUNK]) for shape, ids in by_shape.items()
              for k in range(0, len(ids), CHUNK)]
    for (h, w), ids in chunks:
        stack = np.stack([maps[i] for i in ids])
        if stack.min() < 0 or stack.max() > n_words:
            bad = ids[int(np.argmax((stack < 0).any(axis=(1, 2)) | (stack > n_words).any(
                axis=(1, 2))))]
            raise ValueError(f"candidate {bad}: word ids must lie in [0, {n_words}) or be "
                             f"{n_words} (no word)")
        en, n = _prepare(stack, weighting, n_words)
        score = _all_scores(en, n, qdense, qnorm, levels)
        keep = ar_mask(_cell_windows(h, w), ar_query, ar_threshold)
        if window_set == "large":
            keep &= _LARGE
        if not keep.any():
            keep[0] = True  # no window has the query's shape: fall back to the full map
        score = np.where(keep[None, :], score, -np.inf)
        best = np.argmax(score, axis=1)
        scores[ids] = score[np.arange(n), best]
        windows[ids] = _cell_windows(h, w)[best]
        for i, v in zip(ids, _window_vectors(en, n, best)):
            vectors[i] = v
    return RerankResult(scores, windows, vectors)


def fuse(first: np.ndarray, window: np.ndarray, weight: float) -> np.ndarray:
    """``first / max(first) + weight * window / max(window)`` over the re-ranked top
    (``rerank_score = fused``): float64, one score per candidate.

    Why divide: the first stage's scale depends on the kernel, the query and the index
    (ASMK sums selectivities, BoW is a cosine), the window score is a cosine mix in
    [0, 1]; dividing each by its largest makes ``weight`` mean the same thing for any
    query. A side whose largest score is not positive contributes 0 (nothing to divide
    by, and no evidence to order by)."""
    f = np.asarray(first, np.float64)
    w = np.asarray(window, np.float64)
    if f.shape != w.shape or f.ndim != 1:
        raise ValueError(f"first {f.shape} and window {w.shape} scores must be (T,)")
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be finite and >= 0, got {weight}")
    out = np.zeros(f.size)
    if f.size == 0:
        return out
    if f.max() > 0:
        out += f / f.max()
    if w.max() > 0:
        out += weight * (w / w.max())
    return out


def apply_rerank(order: np.ndarray, scores_top: np.ndarray) -> np.ndarray:
    """The ranking with its first ``len(scores_top)`` entries re-ordered by descending
    ``scores_top`` (ties by database index, the project's rule) and the rest unchanged."""
    order = np.asarray(order)
    s = np.asarray(scores_top, np.float64)
    if s.ndim != 1 or s.size > order.size:
        raise ValueError(f"{s.size} top scores for a ranking of {order.size}")
    top = order[: s.size]
    perm = np.lexsort((top, -s))
    return np.concatenate([top[perm], order[s.size:]])
