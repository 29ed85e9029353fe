"""Inverted file: exact cosine scores, tie order, partitioned build == one-shot build,
memory-mapped loading, the quantisation error bound, and refusal of damaged files."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from lib.errors import ArtefactMismatchError, UserError
from lib.index import inverted_file
from lib.index.inverted_file import (
    WEIGHT_SCALE,
    InvertedFile,
    build_partition,
    merge_partitions,
    quantise,
    rank_scores,
    top_k,
)

K = 300
STEP = 0.5 / WEIGHT_SCALE  # largest error of one stored weight


def random_vectors(rng: np.random.Generator, n: int, k: int = K, max_nnz: int = 40,
                   empty_every: int = 17) -> list[tuple[np.ndarray, np.ndarray]]:
    """L2-normalised non-negative sparse vectors with Zipf-ish word frequencies."""
    p = 1.0 / (np.arange(k) + 5.0)
    p /= p.sum()
    out = []
    for i in range(n):
        if empty_every and i % empty_every == 3:
            out.append((np.zeros(0, np.int32), np.zeros(0, np.float32)))
            continue
        words = rng.choice(k, size=rng.integers(1, max_nnz), p=p)
        idx, cnt = np.unique(words, return_counts=True)
        val = cnt * rng.uniform(0.2, 1.0, idx.size)
        out.append((idx.astype(np.int32), (val / np.linalg.norm(val)).astype(np.float32)))
    return out


def dense(vectors, k: int = K) -> np.ndarray:
    x = np.zeros((len(vectors), k))
    for i, (idx, val) in enumerate(vectors):
        x[i, idx] = val
    return x


def ids(n: int) -> list[str]:
    return [f"img/{i:04d}" for i in range(n)]


def idf_reference(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    df = (x > 0).sum(0)
    idf = np.where(df > 0, np.log(x.shape[0] / np.maximum(df, 1)), 0.0)
    xi = x * idf
    n = np.linalg.norm(xi, axis=1, keepdims=True)
    xi = np.divide(xi, n, out=np.zeros_like(xi), where=n > 0)
    qi = q * idf
    return xi @ (qi / np.linalg.norm(qi))


@pytest.mark.parametrize(("use_idf", "block", "kernels"), [
    (False, 1 << 22, True), (True, 1 << 22, True),  # scipy's compiled kernels
    (False, 1 << 22, False), (True, 1 << 22, False),  # posting runs sliced per word
    (False, 37, True), (False, 37, False),  # 37: a block per word or so
    (False, 1000, True), (True, 1000, False)])  # blocks of many words
def test_scores_match_dense_product(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    use_idf: bool, block: int, kernels: bool) -> None:
    monkeypatch.setattr(inverted_file, "SCORE_BLOCK", block)
    monkeypatch.setattr(inverted_file, "KERNEL_MAX_POSTINGS", 2**31 - 1 if kernels else 0)
    rng = np.random.default_rng(1)
    vecs = random_vectors(rng, 200)
    ivf = InvertedFile.build(tmp_path / "ivf", vecs, K, ids(200), {"k": 1}, idf=use_idf,
                             partition_postings=500)
    assert (ivf._run_kernels() is not None) == kernels  # decided on first use, then kept
    monkeypatch.setattr(inverted_file, "KERNEL_MAX_POSTINGS", 0 if kernels else 2**31 - 1)
    other = InvertedFile.load(ivf.path)  # the other way of reading posting runs
    assert (other._run_kernels() is not None) != kernels
    x = dense(vecs)
    for qv in random_vectors(rng, 12, max_nnz=60, empty_every=0):
        q = np.zeros(K)
        q[qv[0]] = qv[1]
        ref = idf_reference(x, q) if use_idf else x @ q
        got = ivf.scores(qv)
        assert got.dtype == np.float32 and got.shape == (200,)
        qs = ivf.query_weights(qv)[1]
        # |sum_w q_w e_w| <= max|e| * ||q||_1 for stored-weight errors e
        bound = STEP * np.abs(qs).sum() + 1e-6
        assert np.max(np.abs(got - ref)) <= bound
        assert np.max(np.abs(got - ref)) > 0 or not np.any(ref)  # really quantised
        if block > 1000:  # one block: both paths add the same products in word order
            np.testing.assert_array_equal(other.scores(qv), got)
        else:  # the fallback sums each block before adding it: float32 rounding apart
            np.testing.assert_allclose(other.scores(qv), got, rtol=0, atol=1e-6)
        if kernels and block <= 1000:  # the kernels keep adding into one array
            monkeypatch.setattr(inverted_file, "SCORE_BLOCK", 1 << 22)
            np.testing.assert_array_equal(ivf.scores(qv), got)
            monkeypatch.setattr(inverted_file, "SCORE_BLOCK", block)


def test_scores_survive_changed_private_scipy_kernels(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """scipy's kernels are a private module: if a new scipy changes their signature the
    query is scored through the public API instead (same scores), with one warning."""
    rng = np.random.default_rng(4)
    vecs = random_vectors(rng, 100)
    ivf = InvertedFile.build(tmp_path / "ivf", vecs, K, ids(100), {})
    qv = random_vectors(rng, 1, max_nnz=40, empty_every=0)[0]
    ref = ivf.scores(qv)
    assert ivf._run_kernels() is not None

    def changed(*args: object) -> None:
        raise TypeError("csr_row_index() takes 8 arguments")

    ivf._kernels = (changed, *ivf._kernels[1:])
    with caplog.at_level("WARNING", logger="lib.index.inverted_file"):
        np.testing.assert_array_equal(ivf.scores(qv), ref)
        np.testing.assert_array_equal(ivf.scores(qv), ref)
    assert ivf._kernels is None
    assert sum("public scipy.sparse API" in r.getMessage() for r in caplog.records) == 1


def test_quantisation_error_bound_and_ranking(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    w = rng.uniform(0, 1, 100_000)
    w[:3] = [0.0, 1.0, 0.5]
    err = quantise(w).astype(np.float64) / WEIGHT_SCALE - w
    assert np.max(np.abs(err)) <= STEP + 1e-12
    assert quantise(np.array([0.0, 1.0])).tolist() == [0, WEIGHT_SCALE]
    # rankings agree with float scoring up to the stated tolerance (2x the score bound)
    vecs = random_vectors(rng, 300, max_nnz=80)
    ivf = InvertedFile.build(tmp_path / "ivf", vecs, K, ids(300), {})
    x = dense(vecs)
    for qv in random_vectors(rng, 10, max_nnz=80, empty_every=0):
        ref = x @ np.bincount(qv[0], qv[1], minlength=K)
        order, _ = ivf.search(qv)
        tol = 2 * STEP * np.abs(qv[1]).sum()
        assert np.all(np.diff(ref[order]) <= tol)
        ref_order = np.argsort(-ref, kind="stable")
        assert np.mean(order == ref_order) > 0.9  # same ranking except near-ties


def test_tie_order_and_zero_scores_follow_database_order(tmp_path: Path) -> None:
    a = (np.array([1, 5], np.int32), np.array([0.6, 0.8], np.float32))
    b = (np.array([2], np.int32), np.array([1.0], np.float32))
    c = (np.array([5, 7], np.int32), np.array([0.8, 0.6], np.float32))
    e = (np.zeros(0, np.int32), np.zeros(0, np.float32))
    vecs = [b, a, e, c, a, b, a]  # docs 1, 4, 6 tie; 0, 2, 5 score zero
    ivf = InvertedFile.build(tmp_path / "ivf", vecs, 10, ids(7), {})
    order, s = ivf.search(a)
    assert order.dtype == np.int64
    assert order.tolist() == [1, 4, 6, 3, 0, 2, 5]
    assert s[1] == s[4] == s[6] > s[3] > 0 == s[0] == s[2] == s[5]
    for k in range(8):
        assert ivf.search_top(a, k)[0].tolist() == order[:k].tolist()


def test_search_top_equals_full_ranking_prefix(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vecs = random_vectors(rng, 150, max_nnz=5)  # few words -> many exact ties
    vecs += vecs[:40]
    ivf = InvertedFile.build(tmp_path / "ivf", vecs, K, ids(190), {})
    for qv in random_vectors(rng, 5, max_nnz=10, empty_every=0):
        full, s = ivf.search(qv)
        assert np.array_equal(s[full], np.sort(s)[::-1])
        for k in (1, 7, 50, 189, 190, 500):
            assert np.array_equal(ivf.search_top(qv, k)[0], full[:k])


def test_query_validation(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    ivf = InvertedFile.build(tmp_path / "ivf", random_vectors(rng, 20), K, ids(20), {})
    with pytest.raises(ValueError):
        ivf.scores((np.array([K], np.int32), np.array([1.0], np.float32)))
    with pytest.raises(ValueError):
        ivf.scores((np.array([-1], np.int32), np.array([1.0], np.float32)))
    z = ivf.scores((np.zeros(0, np.int32), np.zeros(0, np.float32)))
    assert z.shape == (20,) and not z.any()
    order, _ = ivf.search((np.zeros(0, np.int32), np.zeros(0, np.float32)))
    assert order.tolist() == list(range(20))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("use_idf", [False, True])
def test_partitioned_build_is_byte_identical(tmp_path: Path, use_idf: bool) -> None:
    rng = np.random.default_rng(5)
    vecs = random_vectors(rng, 120)
    meta = {"codebook": "abc", "n": 3}
    one = InvertedFile.build(tmp_path / "one", vecs, K, ids(120), meta, idf=use_idf,
                             partition_postings=10**9)
    many = InvertedFile.build(tmp_path / "many", vecs, K, ids(120), meta, idf=use_idf,
                              partition_postings=97, block_postings=13)
    # explicit partitions built separately (e.g. distractor chunks), then merged
    cuts = [0, 1, 50, 51, 120]
    parts = [build_partition(tmp_path / f"p{j}", vecs[a:b], K, a)
             for j, (a, b) in enumerate(itertools.pairwise(cuts))]
    merged = merge_partitions(parts, tmp_path / "merged", ids(120), meta, idf=use_idf,
                              block_postings=29)
    ref = _files(one.path)
    assert set(ref) == {"meta.json", "image_ids.txt", "offsets.npy", "docs.npy",
                        "weights.npy"} | ({"idf.npy"} if use_idf else set())
    assert _files(many.path) == ref
    assert _files(merged.path) == ref
    assert not (tmp_path / "many" / "parts").exists()


def test_load_is_memory_mapped_and_complete(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    vecs = random_vectors(rng, 50)
    built = InvertedFile.build(tmp_path / "ivf", vecs, K, ids(50), {"x": [1, 2]}, idf=True)
    ivf = InvertedFile.load(tmp_path / "ivf")
    assert isinstance(ivf.docs, np.memmap) and isinstance(ivf.weights, np.memmap)
    assert ivf.image_ids == ids(50) and ivf.n_docs == 50 and ivf.n_words == K
    assert ivf.meta == {"x": [1, 2]} and ivf.header["idf"] is True
    assert ivf.n_postings == sum(v[0].size for v in vecs) == ivf.docs.size
    assert ivf.docs.nbytes + ivf.weights.nbytes == 6 * ivf.n_postings
    assert np.array_equal(ivf.df, (dense(vecs) > 0).sum(0))
    q = vecs[7]
    assert np.array_equal(ivf.scores(q), built.scores(q))
    assert ivf.postings_touched(q) == int(ivf.df[q[0]].sum())
    # doc ids ascend within every word
    d = np.asarray(ivf.docs).astype(np.int64)
    word = np.repeat(np.arange(K), ivf.df)
    same = word[1:] == word[:-1]
    assert same.any() and np.all(np.diff(d)[same] > 0)


def test_damaged_files_raise_user_error_naming_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    vecs = random_vectors(rng, 30)
    path = tmp_path / "ivf"
    InvertedFile.build(path, vecs, K, ids(30), {})
    docs = (path / "docs.npy").read_bytes()
    (path / "docs.npy").write_bytes(docs[: len(docs) - 10])
    with pytest.raises(UserError, match="docs.npy"):
        InvertedFile.load(path)
    (path / "docs.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(UserError, match="docs.npy"):
        InvertedFile.load(path)
    (path / "docs.npy").write_bytes(docs)
    np.save(path / "weights.npy", np.zeros(3, np.float32))
    with pytest.raises(UserError, match="weights.npy"):
        InvertedFile.load(path)
    (path / "meta.json").write_text('{"format": "something-else"}')
    with pytest.raises(UserError, match="meta.json"):
        InvertedFile.load(path)
    (path / "meta.json").write_text("{trunc")
    with pytest.raises(UserError, match="meta.json"):
        InvertedFile.load(path)
    with pytest.raises(UserError, match="not found"):
        InvertedFile.load(tmp_path / "missing")


def test_image_id_count_mismatch_and_duplicates(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    vecs = random_vectors(rng, 10)
    path = tmp_path / "ivf"
    InvertedFile.build(path, vecs, K, ids(10), {})
    (path / "image_ids.txt").write_text("a\nb\n")
    with pytest.raises(UserError, match="image_ids.txt"):
        InvertedFile.load(path)
    with pytest.raises(UserError, match="img/0001"):
        InvertedFile.build(tmp_path / "dup", vecs, K, [*ids(9), "img/0001"], {})
    assert not (tmp_path / "dup").exists()


def test_bad_input_leaves_nothing_behind(tmp_path: Path) -> None:
    good = (np.array([1, 2], np.int32), np.array([0.6, 0.8], np.float32))
    for bad in [(np.array([2, 1], np.int32), np.array([0.6, 0.8], np.float32)),
                (np.array([1, K], np.int32), np.array([0.6, 0.8], np.float32)),
                (np.array([1], np.int32), np.array([2.0], np.float32))]:
        with pytest.raises(ValueError):
            InvertedFile.build(tmp_path / "ivf", [good, bad], K, ids(2), {})
        assert not (tmp_path / "ivf").exists()
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_gaps_and_wrong_counts(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    vecs = random_vectors(rng, 20)
    p0 = build_partition(tmp_path / "p0", vecs[:10], K, 0)
    p2 = build_partition(tmp_path / "p2", vecs[12:], K, 12)
    with pytest.raises(UserError, match="p2"):
        merge_partitions([p0, p2], tmp_path / "out", ids(18), {})
    p1 = build_partition(tmp_path / "p1", vecs[10:], K, 10)
    with pytest.raises(ValueError):
        merge_partitions([p0, p1], tmp_path / "out", ids(19), {})
    ivf = merge_partitions([p0, p1], tmp_path / "out", ids(20), {})
    assert ivf.n_docs == 20


def test_check_meta_names_the_field(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    meta = {"codebook_hash": "abc", "weighting": "centre_prior"}
    ivf = InvertedFile.build(tmp_path / "ivf", random_vectors(rng, 5), K, ids(5), meta)
    ivf.check_meta({"codebook_hash": "abc", "weighting": "centre_prior"},
                   ["codebook_hash", "weighting"])
    with pytest.raises(ArtefactMismatchError, match=r"meta.json.*'weighting'"):
        ivf.check_meta({"codebook_hash": "abc", "weighting": "counts"},
                       ["codebook_hash", "weighting"])


def test_rank_scores_is_a_stable_descending_sort() -> None:
    rng = np.random.default_rng(11)
    s = (rng.integers(0, 50, 5000) / 7).astype(np.float32)  # many exact ties
    s[::13] = 0.0
    s[::29] = -0.0
    ref = np.argsort(-s, kind="stable")
    assert np.array_equal(rank_scores(s), ref)
    small = s[:1000]  # below the radix path's size: one stable argsort, same order
    assert np.array_equal(rank_scores(small), np.argsort(-small, kind="stable"))
    assert np.array_equal(top_k(s, 321), ref[:321])
    for k in (1, 7, 100, 1249, 4999, 5000):  # column-maximum bound (k << n), direct paths
        assert np.array_equal(top_k(s, k), ref[:k]), k
    big = (rng.integers(0, 300, 200_000) / 3).astype(np.float32)  # 32 rows, heavy ties
    assert np.array_equal(top_k(big, 100), np.argsort(-big, kind="stable")[:100])
    neg = s - np.float32(1.0)  # negatives take the fallback path
    assert np.array_equal(rank_scores(neg), np.argsort(-neg, kind="stable"))
    s64 = s.astype(np.float64)
    assert np.array_equal(rank_scores(s64), ref)


@pytest.mark.parametrize("seed", range(6))
def test_top_k_column_bound_is_exact_on_adversarial_scores(seed: int) -> None:
    """The best scores crowded into one column of the bound's matrix, in the leftover
    tail, mostly zeros, or tied: the first k of the full ranking every time."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3_000, 40_000))
    k = int(rng.integers(1, 60))
    kind = seed % 3
    if kind == 0:  # sparse, like a box query over a large index
        s = np.where(rng.random(n) < 0.05, rng.random(n), 0.0).astype(np.float32)
    elif kind == 1:  # few distinct values: ties everywhere
        s = rng.integers(0, 4, n).astype(np.float32)
    else:
        s = rng.random(n).astype(np.float32)
    b = min(inverted_file.TOP_K_ROWS, n // (4 * k))
    g = n // b
    s[np.arange(b) * g + 3] = 2.0 + rng.random(b)  # one column holds b top scores
    s[b * g:] = 5.0  # and the leftover tail the very best
    assert np.array_equal(top_k(s, k), np.argsort(-s, kind="stable")[:k])


def test_top_k_with_fewer_scores_above_zero_than_k() -> None:
    """A sparse query: most of the top k is the tie at zero, in database order."""
    rng = np.random.default_rng(7)
    for n, nz, k in ((200_000, 50, 100), (5_000, 0, 100), (5_000, 99, 100), (5_000, 100, 100),
                     (5_000, 101, 100)):
        s = np.zeros(n, np.float32)
        s[rng.choice(n, nz, replace=False)] = rng.integers(1, 5, nz) / 4  # ties above 0
        s[::7] = -0.0
        assert np.array_equal(top_k(s, k), np.argsort(-s, kind="stable")[:k]), (n, nz)
