"""The re-ranking window score written out by hand, for the brute-force checks of
``lib.search.rerank`` (tests/test_rerank.py with counts, tests/test_rerank_weighting.py
with centre-prior weights): one cosine of explicit weighted histograms per region."""

from __future__ import annotations

import numpy as np

from lib.search import rerank as rr
from lib.search.rerank import lattice


def brute_window_score(q: np.ndarray, cells, m: np.ndarray, k: int, n_words: int,
                       levels: int, qweights: np.ndarray, mweights: np.ndarray) -> float:
    """Window ``k`` of candidate map ``m`` against query map ``q`` inside ``cells`` (the
    whole map when None): the cosine of the weighted histograms of the window and the
    query region, and with two levels also of their four quadrants (quadrants keep their
    cells' weights), as ``(0.5 * whole + sum of quadrants) / 4.5``."""
    r0, c0, r1, c1 = (0, 0, *q.shape) if cells is None else cells

    def cos(a, b) -> float:
        na, nb = np.sqrt(a @ a), np.sqrt(b @ b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

    def hist(words, weights) -> np.ndarray:
        return np.bincount(words.ravel(), weights=weights.ravel(), minlength=n_words)

    def region(a0, b0, a1, b1, e0, f0, e1, f1) -> float:
        return cos(hist(m[a0:a1, b0:b1], mweights[a0:a1, b0:b1]),
                   hist(q[e0:e1, f0:f1], qweights[e0:e1, f0:f1]))

    rb, cb = lattice(m.shape[0]), lattice(m.shape[1])
    (ka, kb), (la, lb) = rr._WIN["r"][k], rr._WIN["c"][k]  # window k's lattice spans
    w0, w1, v0, v1 = rb[ka], rb[kb], cb[la], cb[lb]
    s = region(w0, v0, w1, v1, r0, c0, r1, c1)
    if levels == 1:
        return s
    qm_r, qm_c = r0 + (r1 - r0 + 1) // 2, c0 + (c1 - c0 + 1) // 2
    # window halves lie on the lattice: the middle lattice position of its span
    wm_r, wm_c = rb[(ka + kb) // 2], cb[(la + lb) // 2]
    quads_w = [(w0, v0, wm_r, wm_c), (w0, wm_c, wm_r, v1), (wm_r, v0, w1, wm_c),
               (wm_r, wm_c, w1, v1)]
    quads_q = [(r0, c0, qm_r, qm_c), (r0, qm_c, qm_r, c1), (qm_r, c0, r1, qm_c),
               (qm_r, qm_c, r1, c1)]
    tot = 0.5 * s + sum(region(*a, *b) for a, b in zip(quads_w, quads_q))
    return tot / 4.5
