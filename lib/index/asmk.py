"""ASMK (aggregated selective match kernel), binary, over a CSR inverted file.

The vectorised core of ``kernel = asmk``: it reproduces the scores of the reference
implementation (PyPI ``asmk`` 0.1.1, binary mode, no idf) on our own posting layout, so
that ASMK can be compared with the paper's BoW on the same features and codebook.

Semantics (those of the reference):

* Quantisation: a database feature gets its nearest word; a query feature its ``k``
  nearest words (multiple assignment, exact L2 search with ``faiss.IndexFlatL2``, ties as
  faiss returns them) and contributes to each of them.
* Aggregation, per image and word ``w``: ``r_w = sum over the features assigned to w of
  (x - c_w)``, accumulated in float32 in feature order (the reference's order: bit for bit
  the same residuals, so the same signs even where a component is close to 0).
* Binarisation: bit ``= r_w > 0`` (strictly: a component exactly 0 gives 0), one bit per
  dimension; ``n_bits < D`` keeps the first ``n_bits`` dimensions (PCA components come
  ordered by variance, so these are the most informative ones).
* Similarity of a query word's signature and a posting's signature of the same word:
  ``sim = 1 - 2 * hamming / B`` with ``B = 32 * ceil(n_bits / 32)``. The reference
  normalises by its PACKED bit count (uint32 words, zero padded), not by ``n_bits``; the
  padding bits are 0 on both sides, so they never differ but still count in ``B``. We keep
  that for parity: for ``n_bits`` not a multiple of 32 the similarities are shrunk towards
  1 (``sim >= 1 - 2 * n_bits / B``).
* Selectivity: ``sigma(sim) = sim ** alpha`` if ``sim >= tau`` else 0 (a plain power: a
  negative ``sim``, kept when ``tau < 0``, gives a negative term for odd integer ``alpha``
  and NaN for a fractional one, as in the reference). Not the reference: ``sigma =
  "shifted"`` takes ``((1 + sim) / 2) ** alpha`` instead (the share of agreeing bits,
  in [0, 1], never negative, increasing in ``sim``; ``alpha = 0`` with ``tau = -1`` is
  ``sigma = 1``, the plain word match), with the same threshold ``tau``.
* Score: ``score(q, d) = 1/sqrt(n_q) * 1/sqrt(n_d) * sum over the words w shared by q and d
  of sigma(sim_w)``, ``n_q`` = aggregated query words (words absent from the index
  included), ``n_d`` = distinct words of image ``d``. An empty query scores 0 everywhere
  (the reference divides 0 by 0).

Signatures are packed MSB-first into bytes (``np.packbits``) and padded with zero bytes to
``B / 8`` bytes, i.e. exactly the reference's uint32 words read big-endian
(:func:`to_asmk_packed`). Hamming distances are popcounts (``np.bitwise_count``) of the
XOR-ed rows viewed as uint64 (uint32 when ``B / 8`` is not a multiple of 8).

Layout (that of :mod:`lib.index.inverted_file`, so ``sigs`` can be stored beside
``docs.npy``): ``offsets`` int64 (K+1,), the postings of word ``w`` are
``[offsets[w], offsets[w+1])``; ``docs`` uint32, word-major, ascending doc ids within a
word, at most one posting per (word, doc); ``sigs`` uint8 (n_postings, B/8), row ``i``
the signature of posting ``i``. The image weight ``1/sqrt(n_d)`` depends on the doc only,
so an index can keep it per doc (float32 (n_docs,)) rather than per posting: a posting
then costs 4 + B/8 bytes (20 at 128 bits, 68 at 512).
"""

from __future__ import annotations

import ctypes
import itertools
import weakref
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from lib.index.native import asmk_library

DEFAULT_QUERY_MA = 5  # query multiple assignment (the reference's HOW setting)
DEFAULT_ALPHA = 3.0
DEFAULT_TAU = 0.0
SIGMAS = ("asmk", "shifted")  # selectivity functions (:func:`kernel_table`)
# Postings whose signatures are gathered and XOR-ed at once while scoring: bounds the
# temporary copies (two of B/8 bytes per posting) for queries that touch many postings.
SCORE_BLOCK = 1 << 18

Postings = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

# faiss indexes over the centroids of Codebook-like objects, built once per object.
_INDEXES: weakref.WeakKeyDictionary[Any, faiss.IndexFlatL2] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- signatures

def packed_bits(n_bits: int) -> int:
    """``B``: the bits of a packed signature, ``n_bits`` rounded up to a multiple of 32
    (the reference's uint32 words); the Hamming normaliser of the similarity."""
    if n_bits < 1:
        raise ValueError(f"n_bits = {n_bits}: need at least one bit")
    return 32 * -(-int(n_bits) // 32)


def signature_bytes(n_bits: int) -> int:
    """Bytes of one packed signature (``B / 8``, a multiple of 4)."""
    return packed_bits(n_bits) // 8


def binarize(residuals: np.ndarray, n_bits: int | None = None) -> np.ndarray:
    """(m, >= n_bits) residuals -> (m, B/8) uint8 signatures: bit ``j`` = residual ``j``
    > 0 (strictly), for the first ``n_bits`` components, packed MSB-first, zero padded."""
    r = np.asarray(residuals)
    if r.ndim != 2:
        raise ValueError(f"expected (m, D) residuals, got shape {r.shape}")
    n_bits = r.shape[1] if n_bits is None else int(n_bits)
    if not 1 <= n_bits <= r.shape[1]:
        raise ValueError(f"n_bits = {n_bits}: must lie in [1, {r.shape[1]}]")
    out = np.zeros((r.shape[0], signature_bytes(n_bits)), np.uint8)
    packed = np.packbits(r[:, :n_bits] > 0, axis=1)  # MSB-first, last byte zero padded
    out[:, :packed.shape[1]] = packed
    return out


def to_asmk_packed(sigs: np.ndarray) -> np.ndarray:
    """Our (m, B/8) uint8 signatures as the reference's (m, B/32) uint32 codes (the same
    bits: MSB-first bytes read as big-endian uint32)."""
    s = np.ascontiguousarray(sigs, np.uint8)
    return s.view(">u4").astype(np.uint32)


def _popcount_view(x: np.ndarray) -> np.ndarray:
    """(m, n_bytes) uint8 -> the widest unsigned view whose width divides n_bytes."""
    return x.view(np.uint64 if x.shape[1] % 8 == 0 else np.uint32)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distances (int64) of two (m, n_bytes) uint8 signature arrays."""
    x = np.bitwise_xor(np.ascontiguousarray(a, np.uint8), np.ascontiguousarray(b, np.uint8))
    return np.bitwise_count(_popcount_view(x)).sum(axis=1, dtype=np.int64)


def kernel_table(n_bits: int, alpha: float = DEFAULT_ALPHA,
                 tau: float = DEFAULT_TAU, sigma: str = "asmk") -> np.ndarray:
    """``sigma(sim(h))`` for every Hamming distance ``h`` in [0, B]: float32 (B + 1,).

    Why a table: ``h`` takes only B + 1 values, so scoring looks the kernel up instead of
    thresholding and raising every posting's similarity to ``alpha``. Computed in float32
    exactly as the reference does (``h / B`` in float32, ``-2 * . + 1``, ``sim >= tau``,
    ``np.power``), so the same postings pass the threshold and get the same value.

    ``sigma``: ``asmk`` (the reference, ``sim ** alpha``) or ``shifted``
    (``((1 + sim) / 2) ** alpha``: in [0, 1], so a dissimilar pair never subtracts;
    ``alpha = 0`` gives exactly 1 wherever ``sim >= tau``)."""
    if sigma not in SIGMAS:
        raise ValueError(f"sigma = {sigma!r}: must be one of {', '.join(SIGMAS)}")
    b = packed_bits(n_bits)
    hd = np.arange(b + 1).astype(np.float32) / np.float32(b)
    sim = np.float32(-2) * hd + np.float32(1)
    keep = sim >= float(tau)
    out = np.zeros(b + 1, np.float32)
    base = sim if sigma == "asmk" else (np.float32(1) + sim) / np.float32(2)
    out[keep] = np.power(base[keep], np.float32(alpha))
    return out


# --------------------------------------------------------------------------- quantisation

def centroid_index(centroids: np.ndarray) -> faiss.IndexFlatL2:
    """Exact L2 index over (K, D) centroids (the reference's ``faiss.IndexFlatL2``)."""
    c = np.ascontiguousarray(centroids, np.float32)
    if c.ndim != 2 or c.shape[0] < 1:
        raise ValueError(f"centroids must be (K, D), got shape {c.shape}")
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c)
    return index


def _index_of(codebook: Any) -> faiss.IndexFlatL2:
    """A faiss index for a faiss index, a Codebook-like object (``.centroids``, cached per
    object so a query loop does not copy the centroids every call) or a (K, D) array."""
    if isinstance(codebook, faiss.Index):
        return codebook
    if isinstance(codebook, np.ndarray):
        return centroid_index(codebook)
    index = _INDEXES.get(codebook)
    if index is None:
        index = centroid_index(codebook.centroids)
        _INDEXES[codebook] = index
    return index


def query_words(codebook: Any, features: np.ndarray,
                k: int = DEFAULT_QUERY_MA) -> np.ndarray:
    """(n, k) int64: the ``k`` nearest words of each feature, nearest first (exact L2).

    ``codebook``: a :class:`lib.vocabulary.codebook.Codebook` (or anything with
    ``.centroids``), a (K, D) array, or a prebuilt :func:`centroid_index`. Pass all of an
    image's features in one call, as the reference does: faiss's distance kernel depends
    on the batch size, which can decide exact ties differently."""
    index = _index_of(codebook)
    x = np.ascontiguousarray(features, np.float32)
    if x.ndim != 2 or x.shape[1] != index.d:
        raise ValueError(f"features of shape {x.shape} for {index.d}-D centroids")
    if not 1 <= k <= index.ntotal:
        raise ValueError(f"k = {k}: must lie in [1, {index.ntotal}] (the codebook size)")
    if x.shape[0] == 0:
        return np.zeros((0, k), np.int64)
    _, ids = index.search(x, int(k))
    return ids.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- aggregation

def residual_sums(features: np.ndarray, words: np.ndarray, centroids: np.ndarray,
                  n_bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image's features -> (unique words int32 sorted, float32 (m, n_bits) residual
    sums ``sum (x - c_w)`` over the first ``n_bits`` dimensions, default all).

    ``words``: (n,) or (n, k) word ids per feature (a feature assigned to k words
    contributes its residual to each). Why not ``np.add.reduceat``: its float32 sums are
    not accumulated row after row, so near-zero components can get another sign than
    the reference's ``(x[mask] - c).sum(0)``. Instead the words are grouped by their
    number of features ``L`` (at most ``sqrt(2 n k)`` distinct values, so the loop is
    short whatever the image) and each group's (words, L, D) block of residuals, in
    feature order, is summed along L: the reference's sequential float32 sums, bit for
    bit (``np.add.at`` is exact too but several times slower)."""
    x = np.asarray(features, np.float32)
    c = np.asarray(centroids, np.float32)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"features {x.shape} and centroids {c.shape} must be (n, D), (K, D)")
    w = np.asarray(words)
    if w.ndim == 1:
        w = w[:, None]
    if w.ndim != 2 or w.shape[0] != x.shape[0]:
        raise ValueError(f"words of shape {np.shape(words)} for {x.shape[0]} features")
    n_bits = x.shape[1] if n_bits is None else int(n_bits)
    if not 1 <= n_bits <= x.shape[1]:
        raise ValueError(f"n_bits = {n_bits}: must lie in [1, {x.shape[1]}]")
    flat = w.ravel().astype(np.int64, copy=False)
    if flat.size == 0:
        return np.zeros(0, np.int32), np.zeros((0, n_bits), np.float32)
    if flat.min() < 0 or flat.max() >= c.shape[0]:
        raise ValueError(f"word ids must lie in [0, {c.shape[0]})")
    order = np.argsort(flat, kind="stable")  # within a word: feature order
    sw = flat[order]
    feat = order // w.shape[1]
    starts = np.flatnonzero(np.r_[True, sw[1:] != sw[:-1]])
    lens = np.diff(np.r_[starts, sw.size])
    uw = sw[starts]
    xs = x[:, :n_bits]
    cs = c[:, :n_bits]
    sums = np.empty((uw.size, n_bits), np.float32)
    for ln in np.unique(lens):
        seg = np.flatnonzero(lens == ln)
        rows = (starts[seg][:, None] + np.arange(ln)).ravel()
        resid = xs[feat[rows]] - cs[sw[rows]]  # float32 differences, as the reference
        sums[seg] = resid.reshape(seg.size, ln, n_bits).sum(axis=1)
    return uw.astype(np.int32), sums


def aggregate(features: np.ndarray, words: np.ndarray, centroids: np.ndarray,
              n_bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image's features -> (unique words int32 sorted, signatures uint8 (m, B/8)):
    :func:`residual_sums` binarised (:func:`binarize`) on the first ``n_bits``
    dimensions (default all). ``words``: (n,) or (n, k) word ids per feature."""
    uw, sums = residual_sums(features, words, centroids, n_bits)
    return uw, binarize(sums)


# --------------------------------------------------------------------------- postings

def build_postings(images: Sequence[tuple[np.ndarray, np.ndarray]], n_words: int) -> Postings:
    """In-memory index of aggregated images (doc id = position in ``images``):
    (offsets int64 (K+1,), docs uint32, sigs uint8 (n_postings, B/8), weights float32
    (n_postings,) = 1/sqrt(n_d) of the posting's doc), in the layout of
    :mod:`lib.index.inverted_file` (word-major, doc ids ascending within a word).

    Each image's words must be sorted and unique (as :func:`aggregate` returns them)."""
    n_bytes = None
    for i, (wd, sg) in enumerate(images):
        wd, sg = np.asarray(wd), np.asarray(sg)
        if wd.ndim != 1 or sg.ndim != 2 or sg.shape[0] != wd.size or sg.dtype != np.uint8:
            raise ValueError(f"doc {i}: expected (m,) words and (m, n_bytes) uint8 signatures")
        if n_bytes is not None and sg.shape[1] != n_bytes:
            raise ValueError(f"doc {i}: {sg.shape[1]}-byte signatures, others {n_bytes}")
        n_bytes = sg.shape[1]
        if wd.size and (wd[0] < 0 or wd[-1] >= n_words or np.any(wd[1:] <= wd[:-1])):
            raise ValueError(f"doc {i}: word ids must be sorted, unique, in [0, {n_words})")
    n_docs = len(images)
    lens = np.fromiter((np.asarray(wd).size for wd, _ in images), np.int64, n_docs)
    n_post = int(lens.sum())
    offsets = np.zeros(n_words + 1, np.int64)
    if n_post == 0:
        return (offsets, np.zeros(0, np.uint32), np.zeros((0, n_bytes or 0), np.uint8),
                np.zeros(0, np.float32))
    words = np.concatenate([np.asarray(wd, np.int64) for wd, _ in images])
    sigs = np.concatenate([np.asarray(sg) for _, sg in images])
    docs = np.repeat(np.arange(n_docs, dtype=np.uint32), lens)
    order = np.argsort(words, kind="stable")  # stable: doc ids stay ascending in a word
    np.cumsum(np.bincount(words, minlength=n_words), out=offsets[1:])
    docs = docs[order]
    return offsets, docs, sigs[order], doc_weights(docs, n_docs)[docs]


def doc_weights(docs: np.ndarray, n_docs: int) -> np.ndarray:
    """Per-doc image weights 1/sqrt(n_d) (float32 (n_docs,), 0 for an image without
    postings) from the postings' doc ids: what an index stores instead of a per-posting
    weight (every posting of a doc has the same one)."""
    n = np.bincount(np.asarray(docs, np.int64), minlength=n_docs)
    out = np.zeros(n_docs, np.float32)
    nz = n > 0
    out[nz] = 1.0 / np.sqrt(n[nz])
    return out


def _doc_ids(docs: np.ndarray) -> np.ndarray:
    """Doc ids as uint32, unchanged (no copy) when they already are; other integer ids
    are converted only when they fit."""
    d = np.asarray(docs)
    if d.dtype == np.uint32:
        return d
    if d.dtype.kind not in "iu":
        raise ValueError(f"doc ids of dtype {d.dtype}: expected integers")
    if d.size and (int(d.min()) < 0 or int(d.max()) > np.iinfo(np.uint32).max):
        raise ValueError("doc ids outside [0, 2**32)")
    return d.astype(np.uint32)


def _accumulate_numpy(lo: np.ndarray, hi: np.ndarray, qs: np.ndarray, sigs: np.ndarray,
                      docs: np.ndarray, wts: np.ndarray, per_doc: bool, table: np.ndarray,
                      qwt: np.ndarray | None, n_docs: int) -> np.ndarray:
    """Per-doc float64 sums of ``table[h] * w [* qwt]`` over the runs ``[lo, hi)``.

    One index array gathers every posting run of the query's words (``np.repeat`` of the
    run starts + ``arange``), the query signature of each word is repeated over its run,
    XOR + popcount give the Hamming distances and ``np.bincount`` sums per doc, in blocks
    of about :data:`SCORE_BLOCK` postings (whole words) to bound the temporary copies."""
    n_bytes = sigs.shape[1]
    n_q = lo.size
    lens = hi - lo
    ends = np.cumsum(lens)
    total = int(ends[-1])
    contrib = np.empty(total, np.float64)
    dd = np.empty(total, np.int64)
    # one item per posting (a row gather of (n, bytes) uint8 is several times slower
    # than a 1-D take of fixed-size items), then words as wide as the signature allows,
    # popcounted one column at a time (no per-row sum over a temporary)
    wide = np.uint64 if n_bytes % 8 == 0 else np.uint32
    rows = np.ascontiguousarray(sigs).view(np.dtype((np.void, n_bytes))).reshape(-1)
    q_wide = np.ascontiguousarray(qs).view(wide)
    # word blocks: [b0, b1) with about SCORE_BLOCK postings each (at least one word)
    cuts = np.searchsorted(ends, np.arange(SCORE_BLOCK, total, SCORE_BLOCK), side="left")
    bounds = np.unique(np.r_[0, cuts + 1, n_q].clip(0, n_q))
    for b0, b1 in itertools.pairwise(bounds.tolist()):
        p0 = int(ends[b0 - 1]) if b0 else 0
        p1 = int(ends[b1 - 1])
        if p1 == p0:
            continue
        ln = lens[b0:b1]
        idx = np.arange(p0, p1, dtype=np.int64) + np.repeat(lo[b0:b1] - (ends[b0:b1] - ln), ln)
        g = rows.take(idx).view(wide).reshape(idx.size, -1)
        h = np.zeros(idx.size, np.int64)
        for j in range(g.shape[1]):
            h += np.bitwise_count(g[:, j] ^ np.repeat(q_wide[b0:b1, j], ln))
        d = np.asarray(docs[idx]).astype(np.int64)
        if d.max() >= n_docs:
            raise ValueError(f"postings name a doc id >= {n_docs} (a damaged index?)")
        w = wts[d] if per_doc else np.asarray(wts[idx])
        contrib[p0:p1] = table[h] * w
        if qwt is not None:
            contrib[p0:p1] *= np.repeat(qwt[b0:b1], ln)
        dd[p0:p1] = d
    return np.bincount(dd, weights=contrib, minlength=n_docs)


def _c_array(a: np.ndarray, dtype: Any) -> np.ndarray:
    """``a`` as a contiguous, aligned array of ``dtype`` for a C pointer: the index's
    memory-mapped arrays already are, so they are passed in place (no copy)."""
    return np.require(a, dtype, ["C", "A"])


def _accumulate_native(lib: Any, lo: np.ndarray, hi: np.ndarray, qs: np.ndarray,
                       sigs: np.ndarray, docs: np.ndarray, wts: np.ndarray, per_doc: bool,
                       table: np.ndarray, qwt: np.ndarray | None, n_docs: int) -> np.ndarray:
    """:func:`_accumulate_numpy` in one compiled pass (``asmk_native.c``), same sums."""
    lo, hi = _c_array(lo, np.int64), _c_array(hi, np.int64)
    qs, sigs = _c_array(qs, np.uint8), _c_array(sigs, np.uint8)
    docs, wts = _c_array(docs, np.uint32), _c_array(wts, np.float32)
    table = _c_array(table, np.float64)
    q = None if qwt is None else _c_array(qwt, np.float64)
    acc = np.zeros(n_docs, np.float64)
    bad = lib.asmk_accumulate(n_docs, lo.size, lo.ctypes.data, hi.ctypes.data, qs.ctypes.data,
                              sigs.ctypes.data, sigs.shape[1], docs.ctypes.data, wts.ctypes.data,
                              int(per_doc), table.ctypes.data,
                              None if q is None else q.ctypes.data, acc.ctypes.data)
    if bad:
        raise ValueError(f"{bad} postings name a doc id >= {n_docs} (a damaged index?)")
    return acc


# --------------------------------------------------------------------------- scoring

def score_postings(query_words: np.ndarray, query_sigs: np.ndarray, offsets: np.ndarray,
                   docs: np.ndarray, sigs: np.ndarray, weights: np.ndarray, n_docs: int,
                   alpha: float = DEFAULT_ALPHA, tau: float = DEFAULT_TAU,
                   n_bits: int | None = None, *, per_doc: bool | None = None,
                   query_weights: np.ndarray | None = None,
                   sigma: str = "asmk", native: bool | ctypes.CDLL = True) -> np.ndarray:
    """ASMK scores (float32 (n_docs,)) of one aggregated query against the postings.

    ``query_words``/``query_sigs``: :func:`aggregate`'s output for the query (unique
    words). ``weights``: per posting (n_postings,) or per doc (n_docs,); ``per_doc``
    says which, or None to tell by length (an error when both lengths agree).
    ``n_bits``: the signatures' bits (default: 8 * their bytes); it sets ``B``.
    ``query_weights``: one weight per query word instead of the reference's uniform
    1/sqrt(n_q) (a weighted kernel: BLCF's word weights on both sides, see the
    ``asmk_weighting`` setting). ``sigma``: the selectivity function
    (:func:`kernel_table`; ``asmk``, the reference, or ``shifted``).

    The kernel is looked up in a table (:func:`kernel_table`) by each posting's Hamming
    distance and summed per doc, in float64, by the compiled loop of
    :mod:`lib.index.native` when it is available (``native=False`` forbids it; a library
    from :func:`lib.index.native.build_variant` is used instead of the cached one), else
    by numpy (:func:`_accumulate_numpy`): the same sums either way."""
    qw = np.asarray(query_words, np.int64).ravel()
    qs = np.asarray(query_sigs, np.uint8)
    n_words = np.asarray(offsets).size - 1
    n_bytes = sigs.shape[1]
    n_bits = 8 * n_bytes if n_bits is None else int(n_bits)
    if signature_bytes(n_bits) != n_bytes:
        raise ValueError(f"{n_bytes}-byte signatures do not hold {n_bits} packed bits")
    if qs.shape != (qw.size, n_bytes):
        raise ValueError(f"query signatures of shape {qs.shape}, expected {(qw.size, n_bytes)}")
    if qw.size == 0:
        return np.zeros(n_docs, np.float32)
    # aggregate() gives sorted words: strictly increasing proves them unique cheaply
    unique = bool(np.all(qw[1:] > qw[:-1])) or np.unique(qw).size == qw.size
    if qw.min() < 0 or qw.max() >= n_words or not unique:
        raise ValueError(f"query words must be unique and lie in [0, {n_words})")
    # weights are stored as float32 and doc ids as uint32: both paths get exactly these
    wts = np.asarray(weights, np.float32)
    docs = _doc_ids(docs)
    if per_doc is None:
        if wts.size == n_docs == docs.size:
            raise ValueError("weights: as many docs as postings, say per_doc=True/False")
        per_doc = wts.size == n_docs
    if wts.size != (n_docs if per_doc else docs.size):
        raise ValueError(f"{wts.size} weights for {n_docs} docs / {docs.size} postings")
    table = kernel_table(n_bits, alpha, tau, sigma).astype(np.float64)
    qwt = None
    if query_weights is not None:
        qwt = np.asarray(query_weights, np.float64).ravel()
        if qwt.shape != qw.shape:
            raise ValueError(f"{qwt.size} query weights for {qw.size} query words")
    if docs.size != sigs.shape[0]:
        raise ValueError(f"{docs.size} doc ids for {sigs.shape[0]} signatures")
    lo = offsets[qw].astype(np.int64)
    hi = offsets[qw + 1].astype(np.int64)
    # the compiled loop reads [lo, hi) unchecked: a damaged offsets array must not reach it
    if lo.min() < 0 or (hi < lo).any() or hi.max() > docs.size:
        raise ValueError(f"offsets of the query's words out of order or beyond the "
                         f"{docs.size} postings (a damaged index?)")
    if int((hi - lo).sum()) == 0:
        return np.zeros(n_docs, np.float32)
    if isinstance(native, (bool, np.bool_)):
        lib = asmk_library() if native else None
    elif hasattr(native, "asmk_accumulate"):
        lib = native
    else:
        raise TypeError(f"native={native!r}: expected a bool or a library from "
                        "lib.index.native.build_variant")
    if lib is not None:
        acc = _accumulate_native(lib, lo, hi, qs, sigs, docs, wts, per_doc, table, qwt,
                                 n_docs)
    else:
        acc = _accumulate_numpy(lo, hi, qs, sigs, docs, wts, per_doc, table, qwt, n_docs)
    if qwt is None:
        acc /= np.sqrt(qw.size)  # in place: no float64 temporary per query
    return acc.astype(np.float32)
