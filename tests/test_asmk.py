"""ASMK core (lib/index/asmk.py): a hand-worked case, the vectorised functions against a
slow loop-by-loop reference of the asmk 0.1.1 semantics, the packing layout and edge
cases. The asmk package itself is not needed (benchmarks/bench_asmk_parity.py runs it)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lib.index import asmk
from lib.index.asmk import (
    aggregate,
    binarize,
    build_postings,
    doc_weights,
    hamming,
    kernel_table,
    packed_bits,
    query_words,
    residual_sums,
    score_postings,
    signature_bytes,
    to_asmk_packed,
)
from lib.index.inverted_file import InvertedFile
from lib.vocabulary.codebook import Codebook

# --------------------------------------------------------------------------- hand-made case

# Two words in 4-D: c0 = 0, c1 = (1, 1, 1, 1). B = 32 (not D = 4): sim = 1 - 2h/32.
HAND_C = np.array([[0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
HAND_DB = [
    # doc 0: word 0: r = (1, -1, 1, -1) -> bits 1010; word 1: (2, 2, 0, 2) - c1 =
    # (1, 1, -1, 1) -> bits 1101. n_d = 2.
    (np.array([[1, -1, 1, -1], [2, 2, 0, 2]], np.float32), np.array([0, 1])),
    # doc 1: word 0 twice: r = (1, 1, -1, -1) + (-0.5, 1, 1, -1) = (0.5, 2, 0, -2)
    # -> bits 1100 (the exact 0 gives bit 0). n_d = 1.
    (np.array([[1, 1, -1, -1], [-0.5, 1, 1, -1]], np.float32), np.array([0, 0])),
    # doc 2: word 1: (0, 0, 0, 2) - c1 = (-1, -1, -1, 1) -> bits 0001. n_d = 1.
    (np.array([[0, 0, 0, 2]], np.float32), np.array([1])),
]
# query: word 0: r = (1, -1, 1, -1) -> 1010; word 1: (3, 3, 3, 3) - c1 = (2, 2, 2, 2) -> 1111.
HAND_Q = (np.array([[1, -1, 1, -1], [3, 3, 3, 3]], np.float32), np.array([0, 1]))


def _sig(bits: str) -> list[int]:
    """4 bits MSB-first in the first byte, then 3 zero bytes of padding (B = 32)."""
    return [int(bits.ljust(8, "0"), 2), 0, 0, 0]


def _hand_index() -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, np.ndarray]]:
    images = [aggregate(x, w, HAND_C) for x, w in HAND_DB]
    return build_postings(images, 2), aggregate(*HAND_Q, HAND_C)


def test_hand_made_signatures_and_layout() -> None:
    (offsets, docs, sigs, weights), (qw, qs) = _hand_index()
    assert offsets.tolist() == [0, 2, 4]  # word 0: docs 0, 1; word 1: docs 0, 2
    assert docs.tolist() == [0, 1, 0, 2] and docs.dtype == np.uint32
    assert sigs.tolist() == [_sig("1010"), _sig("1100"), _sig("1101"), _sig("0001")]
    np.testing.assert_allclose(weights, [1 / math.sqrt(2), 1, 1 / math.sqrt(2), 1])
    assert qw.tolist() == [0, 1] and qs.tolist() == [_sig("1010"), _sig("1111")]


@pytest.mark.parametrize(("alpha", "tau", "expected"), [
    # alpha 3, tau 0. doc 0: word 0 h = 0 -> sim 1 -> 1; word 1: 1101 vs 1111, h = 1 ->
    # sim 1 - 2/32 = 0.9375 -> 0.9375^3 = 0.823974609375; sum 1.823974609375, times
    # 1/sqrt(n_q = 2) * 1/sqrt(n_d = 2) = 1/2 -> 0.9119873046875.
    # doc 1: word 0: 1100 vs 1010, h = 2 -> sim 0.875 -> 0.669921875, / sqrt(2) * 1.
    # doc 2: word 1: 0001 vs 1111, h = 3 -> sim 0.8125 -> 0.536376953125, / sqrt(2) * 1.
    (3.0, 0.0, [0.9119873046875, 0.669921875 / math.sqrt(2),
                0.536376953125 / math.sqrt(2)]),
    # tau 0.9: 0.875 and 0.8125 fall below; doc 0 keeps 1 and 0.9375 (>= 0.9).
    (3.0, 0.9, [0.9119873046875, 0.0, 0.0]),
    # tau 0.9375: kept since >= (not >); alpha 1: doc 0 (1 + 0.9375) / 2 = 0.96875.
    (1.0, 0.9375, [0.96875, 0.0, 0.0]),
])
def test_hand_made_scores(alpha: float, tau: float, expected: list[float]) -> None:
    (offsets, docs, sigs, weights), (qw, qs) = _hand_index()
    s = score_postings(qw, qs, offsets, docs, sigs, weights, 3, alpha=alpha, tau=tau,
                       n_bits=4)
    assert s.dtype == np.float32
    np.testing.assert_allclose(s, expected, rtol=1e-6, atol=1e-7)
    # per-doc weights give the same scores as per-posting ones
    s2 = score_postings(qw, qs, offsets, docs, sigs, doc_weights(docs, 3), 3, alpha=alpha,
                        tau=tau, n_bits=4, per_doc=True)
    np.testing.assert_array_equal(s, s2)


# --------------------------------------------------------------------------- slow reference

def ref_quantise(cent: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    d = ((x[:, None, :].astype(np.float64) - cent[None].astype(np.float64)) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def ref_aggregate(x: np.ndarray, words: np.ndarray, cent: np.ndarray,
                  n_bits: int) -> dict[int, np.ndarray]:
    """asmk's aggregate_image, loop by loop: word -> residual sum (first n_bits dims)."""
    words = words.reshape(len(x), -1) if len(x) else words
    out = {}
    for w in np.unique(words):
        mask = (words == w).any(axis=1)
        out[int(w)] = (x[mask] - cent[w]).sum(0)[:n_bits]  # the reference's expression
    return out


def ref_scores(q: dict[int, np.ndarray], db: list[dict[int, np.ndarray]], n_bits: int,
               alpha: float, tau: float) -> np.ndarray:
    b = 32 * math.ceil(n_bits / 32)
    out = np.zeros(len(db))
    if not q:
        return out
    for d, img in enumerate(db):
        s = 0.0
        for w, rq in q.items():
            if w in img:
                h = int(np.sum((rq > 0) != (img[w] > 0)))
                sim = 1 - 2 * h / b
                if sim >= tau:
                    s += sim ** alpha
        if img:
            out[d] = s / math.sqrt(len(q)) / math.sqrt(len(img))
    return out


def random_data(seed: int, dim: int, k_words: int = 64, used: int = 48, n_db: int = 25
                ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Centroids, database images (features near words [0, used) only: the others are
    absent from the index; one image without features) and query images (any word)."""
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((k_words, dim)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)

    def image(n: int, words_from: int) -> np.ndarray:
        w = rng.integers(0, words_from, n)
        x = cent[w] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    db = [image(0 if i == 3 else int(rng.integers(1, 40)), used) for i in range(n_db)]
    queries = [image(int(rng.integers(1, 30)), k_words) for _ in range(6)]
    return cent, db, queries


CASES = [  # dim, n_bits, query MA, alpha, tau
    (16, 16, 1, 3.0, 0.0),
    (40, 40, 5, 3.0, 0.0),   # D not a multiple of 32: B = 64
    (64, 20, 3, 3.0, 0.25),  # n_bits < D, B = 32; tau > 0
    (128, 100, 5, 3.0, 0.1),  # B = 128
    (128, 128, 5, 1.0, -0.5),  # negative similarities kept (odd power)
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("dim", "n_bits", "ma", "alpha", "tau"), CASES)
def test_against_reference(seed: int, dim: int, n_bits: int, ma: int, alpha: float,
                           tau: float) -> None:
    cent, db, queries = random_data(seed, dim)
    ref_db, images = [], []
    for x in db:
        w = query_words(cent, x, 1)
        np.testing.assert_array_equal(w, ref_quantise(cent, x, 1))
        ref_db.append(ref_aggregate(x, w, cent, n_bits))
        images.append(aggregate(x, w[:, 0], cent, n_bits))
        assert images[-1][0].tolist() == sorted(ref_db[-1])
        for word, sig in zip(*images[-1]):
            bits = np.unpackbits(sig)
            assert bits[:n_bits].tolist() == (ref_db[-1][int(word)] > 0).tolist()
            assert not bits[n_bits:].any()  # zero padding up to B
    offsets, docs, sigs, weights = build_postings(images, len(cent))
    assert sigs.shape[1] == signature_bytes(n_bits)
    for x in queries:
        qw = query_words(cent, x, ma)
        np.testing.assert_array_equal(qw, ref_quantise(cent, x, ma))
        q_ref = ref_aggregate(x, qw, cent, n_bits)
        uw, qs = aggregate(x, qw, cent, n_bits)
        assert uw.tolist() == sorted(q_ref)
        s = score_postings(uw, qs, offsets, docs, sigs, weights, len(db), alpha=alpha,
                           tau=tau, n_bits=n_bits)
        np.testing.assert_allclose(s, ref_scores(q_ref, ref_db, n_bits, alpha, tau),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_residual_sums_bit_exact(seed: int) -> None:
    """Per-word sums equal the reference's float32 ``(x[mask] - c).sum(0)`` bit for bit
    (same signs even for near-zero components), with many features per word."""
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((20, 48)).astype(np.float32)
    x = rng.standard_normal((700, 48)).astype(np.float32)
    w = np.stack([rng.integers(0, 20, 700), rng.integers(0, 20, 700)], axis=1)
    w[:, 1] = np.where(w[:, 1] == w[:, 0], (w[:, 0] + 1) % 20, w[:, 1])  # distinct per row
    w[:5] = [[7, 3]] * 5  # a word with several rows of equal length groups
    uw, sums = residual_sums(x, w, cent)
    ref = ref_aggregate(x, w, cent, 48)
    assert uw.tolist() == sorted(ref)
    for word, row in zip(uw, sums):
        assert np.array_equal(row, ref[int(word)])


def test_query_words_inputs_agree() -> None:
    cent, _, queries = random_data(5, 32)
    x = queries[0]
    a = query_words(cent, x, 5)
    cb = Codebook(cent)
    np.testing.assert_array_equal(query_words(cb, x, 5), a)
    np.testing.assert_array_equal(query_words(cb, x, 5), a)  # cached index
    np.testing.assert_array_equal(query_words(asmk.centroid_index(cent), x, 5), a)
    assert query_words(cent, x[:0], 5).shape == (0, 5)
    with pytest.raises(ValueError):
        query_words(cent, x, 65)


def test_small_score_blocks_give_same_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    cent, db, queries = random_data(3, 40)
    images = [aggregate(x, query_words(cent, x, 1), cent) for x in db]
    index = build_postings(images, len(cent))
    uw, qs = aggregate(queries[0], query_words(cent, queries[0], 5), cent)
    full = score_postings(uw, qs, *index, len(db), n_bits=40)
    for block in (1, 3, 7):
        monkeypatch.setattr(asmk, "SCORE_BLOCK", block)
        np.testing.assert_allclose(score_postings(uw, qs, *index, len(db), n_bits=40), full,
                                   rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- edges

def test_empty_query_and_absent_words() -> None:
    cent, db, _ = random_data(4, 32)
    images = [aggregate(x, query_words(cent, x, 1), cent) for x in db]
    offsets, docs, sigs, weights = build_postings(images, len(cent))
    # a query without features: no words, scores 0 (the reference would divide 0 by 0)
    uw, qs = aggregate(np.zeros((0, 32), np.float32), np.zeros((0, 5), np.int64), cent)
    assert uw.shape == (0,) and qs.shape == (0, 4)
    s = score_postings(uw, qs, offsets, docs, sigs, weights, len(db), n_bits=32)
    assert s.dtype == np.float32 and not s.any()
    # only words absent from the index (48..63): every score 0
    x = cent[[50, 60]]
    uw, qs = aggregate(x, query_words(cent, x, 1), cent)
    assert uw.tolist() == [50, 60]
    assert not score_postings(uw, qs, offsets, docs, sigs, weights, len(db)).any()


def test_zero_residual_gives_bit_zero() -> None:
    r = np.array([[0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0, 0.0, 1.0]], np.float32)
    assert np.unpackbits(binarize(r))[:8].tolist() == [0, 0, 1, 0, 1, 0, 0, 1]
    # through aggregate: the residual of a feature equal to its centroid is exactly 0
    c = np.array([[0.5, -0.5, 0.25, 0.0]], np.float32)
    _, sig = aggregate(c.copy(), np.array([0]), c)
    assert not sig.any()


def _asmk_pack(bits: np.ndarray) -> np.ndarray:
    """asmk's hamming.binarize_and_pack, loop by loop: 32 bits per uint32, MSB first, the
    last word shifted left (zero padded)."""
    out = []
    for off in range(0, bits.size, 32):
        chunk = bits[off:off + 32]
        v = 0
        for b in chunk:
            v = (v << 1) + int(b)
        out.append(v << (32 - chunk.size))
    return np.array(out, np.uint32)


@pytest.mark.parametrize("dim", [8, 32, 40, 100, 128, 512])
def test_packing_matches_asmk_codes(dim: int) -> None:
    r = np.random.default_rng(dim).standard_normal((5, dim)).astype(np.float32)
    sigs = binarize(r)
    assert sigs.shape == (5, signature_bytes(dim))
    ref = np.stack([_asmk_pack(row > 0) for row in r])
    np.testing.assert_array_equal(to_asmk_packed(sigs), ref)
    # Hamming distance of our bytes == popcount of the reference's XOR-ed uint32 codes
    h_ref = [sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(ref[i], ref[0]))
             for i in range(5)]
    assert hamming(sigs, np.repeat(sigs[:1], 5, axis=0)).tolist() == h_ref


def test_sizes_and_kernel_table() -> None:
    assert [packed_bits(n) for n in (1, 32, 33, 40, 100, 128, 512)] == \
        [32, 32, 64, 64, 128, 128, 512]
    assert signature_bytes(128) == 16 and signature_bytes(512) == 64
    t = kernel_table(20, alpha=3.0, tau=0.5)  # B = 32: sim = 1 - h/16
    assert t.shape == (33,) and t.dtype == np.float32
    assert t[0] == 1.0 and t[8] == np.float32(0.125)  # sim 0.5 >= tau 0.5: kept
    assert t[9] == 0.0 and not t[9:].any()
    t = kernel_table(32, alpha=3.0, tau=-1.0)
    assert t[32] == -1.0 and t[16] == 0.0


def test_build_postings_matches_inverted_file_layout(tmp_path: Path) -> None:
    """Same offsets and doc order as lib/index/inverted_file.py for the same word sets,
    so signatures can later be stored beside its docs.npy."""
    cent, db, _ = random_data(6, 32)
    images = [aggregate(x, query_words(cent, x, 1), cent) for x in db]
    offsets, docs, sigs, weights = build_postings(images, len(cent))
    assert offsets.dtype == np.int64 and docs.dtype == np.uint32 and sigs.dtype == np.uint8
    vecs = [(w, np.full(w.size, 1 / math.sqrt(w.size) if w.size else 0, np.float32))
            for w, _ in images]
    ivf = InvertedFile.build(tmp_path / "ivf", vecs, len(cent),
                             [f"i{i}" for i in range(len(db))], {})
    np.testing.assert_array_equal(offsets, np.asarray(ivf.offsets))
    np.testing.assert_array_equal(docs, np.asarray(ivf.docs))
    n_d = np.array([w.size for w, _ in images])
    np.testing.assert_allclose(weights, 1 / np.sqrt(n_d[docs]), rtol=1e-7)
    dw = doc_weights(docs, len(db))
    assert dw[3] == 0.0  # the image without features
    np.testing.assert_array_equal(dw[docs], weights)
    # each posting's signature is its image's signature of that word
    for w in range(len(cent)):
        for p in range(offsets[w], offsets[w + 1]):
            words, s = images[docs[p]]
            np.testing.assert_array_equal(sigs[p], s[np.searchsorted(words, w)])


def test_query_words_in_any_order_score_the_same() -> None:
    """Sorted words take a cheap uniqueness check; unsorted ones the full one, and score
    the same once their signatures follow them."""
    (offsets, docs, sigs, weights), (qw, qs) = _hand_index()
    assert qw.size > 1
    ref = score_postings(qw, qs, offsets, docs, sigs, weights, 3)
    rev = score_postings(qw[::-1], qs[::-1], offsets, docs, sigs, weights, 3)
    np.testing.assert_allclose(rev, ref, rtol=1e-6)
    assert ref.any()


def test_bad_inputs() -> None:
    (offsets, docs, sigs, weights), (qw, qs) = _hand_index()
    with pytest.raises(ValueError, match="unique"):
        score_postings(np.array([0, 0]), qs, offsets, docs, sigs, weights, 3)
    with pytest.raises(ValueError, match="unique"):  # unsorted with a repeat
        score_postings(np.array([1, 0, 1]), np.repeat(qs[:1], 3, 0), offsets, docs, sigs,
                       weights, 3)
    with pytest.raises(ValueError, match="bits"):
        score_postings(qw, qs, offsets, docs, sigs, weights, 3, n_bits=40)
    with pytest.raises(ValueError, match="per_doc"):  # 4 postings, 4 docs: ambiguous
        score_postings(qw, qs, offsets, docs, sigs, weights, 4)
    with pytest.raises(ValueError, match="sorted"):
        build_postings([(np.array([1, 0]), np.zeros((2, 4), np.uint8))], 2)
    with pytest.raises(ValueError):
        aggregate(HAND_Q[0], np.array([0, 2]), HAND_C)  # word 2 of a 2-word codebook
    with pytest.raises(ValueError):
        aggregate(HAND_Q[0], HAND_Q[1], HAND_C, n_bits=5)


# --------------------------------------------------------------------------- sigma = shifted

def test_shifted_kernel_table_by_hand() -> None:
    """((1 + sim) / 2) ** alpha = (1 - h / B) ** alpha: B = 32, h = 0, 8, 16, 24, 32 give
    sim 1, 0.5, 0, -0.5, -1 and shifted 1, 0.75, 0.5, 0.25, 0."""
    t = kernel_table(32, alpha=1.0, tau=-1.0, sigma="shifted")
    np.testing.assert_array_equal(t[[0, 8, 16, 24, 32]], [1.0, 0.75, 0.5, 0.25, 0.0])
    t = kernel_table(32, alpha=2.0, tau=-1.0, sigma="shifted")
    np.testing.assert_array_equal(t[[0, 8, 16, 24, 32]], [1.0, 0.5625, 0.25, 0.0625, 0.0])
    # tau keeps its meaning: pairs below it count 0 (sim 0 >= 0 is kept)
    t = kernel_table(32, alpha=1.0, tau=0.0, sigma="shifted")
    assert t[16] == 0.5 and not t[17:].any()
    with pytest.raises(ValueError, match="sigma"):
        kernel_table(32, sigma="linear")


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("n_bits", [20, 128])
def test_shifted_is_monotone_and_never_negative(alpha: float, n_bits: int) -> None:
    t = kernel_table(n_bits, alpha=alpha, tau=-1.0, sigma="shifted")
    assert t[0] == 1.0 and (t >= 0).all() and (t <= 1).all()
    assert (np.diff(t) <= 0).all()  # more differing bits, never a larger value
    with np.errstate(invalid="ignore"):  # sim ** alpha: negative or NaN below 0
        ref = kernel_table(n_bits, alpha=alpha, tau=-1.0)
    assert np.isnan(ref).any() or (ref < 0).any()


def test_shifted_with_alpha_zero_is_the_weighted_word_match() -> None:
    """sigma = shifted, alpha 0, tau -1: every shared word counts 1, whatever the
    signatures: the scores are exactly sum_w a_q(w) a_d(w), i.e. the BoW dot product of
    the word weights (with asmk_weighting = bow, the paper's cosine)."""
    rng = np.random.default_rng(3)
    n_words, n_docs, n_bytes = 50, 12, 16
    images, dense = [], np.zeros((n_docs, n_words))
    for d in range(n_docs):
        w = np.sort(rng.choice(n_words, size=int(rng.integers(1, 20)), replace=False))
        images.append((w.astype(np.int32), rng.integers(0, 256, (w.size, n_bytes), np.uint8)))
        v = rng.random(w.size)
        dense[d, w] = v / np.linalg.norm(v)
    offsets, docs, sigs, _ = build_postings(images, n_words)
    words_of = np.repeat(np.arange(n_words), np.diff(offsets))
    weights = dense[docs.astype(np.int64), words_of].astype(np.float32)
    qw = np.sort(rng.choice(n_words, size=15, replace=False))
    qs = rng.integers(0, 256, (qw.size, n_bytes), np.uint8)
    qv = rng.random(qw.size)
    qv /= np.linalg.norm(qv)
    got = score_postings(qw, qs, offsets, docs, sigs, weights, n_docs, alpha=0.0, tau=-1.0,
                         per_doc=False, query_weights=qv, sigma="shifted")
    want = dense.astype(np.float32).astype(np.float64)[:, qw] @ qv
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # and the same as the reference sigma with alpha 0, tau -1 (sim ** 0 = 1)
    ref = score_postings(qw, qs, offsets, docs, sigs, weights, n_docs, alpha=0.0, tau=-1.0,
                         per_doc=False, query_weights=qv)
    np.testing.assert_array_equal(got, ref)
    # alpha > 0: every term shrinks by (1 - h / B) ** alpha, so no score grows, none < 0
    sh = score_postings(qw, qs, offsets, docs, sigs, weights, n_docs, alpha=1.0, tau=-1.0,
                        per_doc=False, query_weights=qv, sigma="shifted")
    assert (sh >= 0).all() and (sh <= got + 1e-7).all()


def test_shifted_hand_made_scores() -> None:
    """The hand-made index with sigma = shifted, alpha 1, tau -1 (n_bits 4, B = 32):
    doc 0 shares word 0 (h 0: 1) and word 1 (h 1: 31/32); doc 1 word 0 (1010 vs 1100,
    h 2: 30/32); doc 2 word 1 (1111 vs 0001, h 3: 29/32); uniform weights."""
    (offsets, docs, sigs, weights), (qw, qs) = _hand_index()
    s = score_postings(qw, qs, offsets, docs, sigs, weights, 3, alpha=1.0, tau=-1.0,
                       n_bits=4, sigma="shifted")
    q = 1 / math.sqrt(2)
    np.testing.assert_allclose(s, [q * (1 + 31 / 32) / math.sqrt(2), q * 30 / 32,
                                   q * 29 / 32], rtol=1e-6)
