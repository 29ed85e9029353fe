"""k-means reproducibility and quality, exact assignment against brute force, the
approximate mode (PQ fast-scan shortlist re-ranked exactly) and the codebook file format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lib.errors import UserError
from lib.vocabulary.codebook import Codebook, kmeans_objective, train_kmeans


def _blobs(n: int = 3000, d: int = 16, k: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32) * 4
    lab = rng.integers(0, k, n)
    x = centres[lab] + rng.standard_normal((n, d)).astype(np.float32) * 0.3
    return x.astype(np.float32), centres


def _brute(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    d = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    return d.argmin(1)


@pytest.mark.parametrize("mode", ["exact", "approximate"])
def test_kmeans_reproducible_for_a_seed(mode):
    x, _ = _blobs(1500)
    a = train_kmeans(x, 20, niter=5, seed=7, mode=mode, device="cpu").centroids
    b = train_kmeans(x, 20, niter=5, seed=7, mode=mode, device="cpu").centroids
    assert a.dtype == np.float32 and a.shape == (20, 16)
    np.testing.assert_array_equal(a, b)
    c = train_kmeans(x, 20, niter=5, seed=8, mode=mode, device="cpu").centroids
    assert not np.array_equal(a, c)


def test_kmeans_objective_decreases_and_recovers_blobs():
    x, _ = _blobs()
    runs = [train_kmeans(x, 20, niter=n, seed=1, device="cpu") for n in (1, 3, 10)]
    obj = [kmeans_objective(x, r.centroids) for r in runs]
    assert obj[0] >= obj[1] >= obj[2] and obj[2] < obj[0]
    # the reported objective is that of the last assignment step: at least the final one
    assert runs[2].objective >= obj[2] * (1 - 1e-6)
    assert runs[2].niter == 10 and runs[2].n_train == len(x) and runs[2].device == "cpu"
    # 5x more centres than blobs (so the random init covers every blob): Lloyd gets close
    # to the noise floor n * d * 0.3^2 (one blob left without a centre costs ~20x more)
    many = kmeans_objective(x, train_kmeans(x, 100, niter=10, seed=1, device="cpu").centroids)
    assert many < 2.0 * len(x) * 16 * 0.09


def test_kmeans_matches_faiss_lloyd_on_same_init():
    faiss = pytest.importorskip("faiss")
    x, _ = _blobs(1200, k=10)
    ours = train_kmeans(x, 10, niter=1, seed=3, device="cpu").centroids
    # one Lloyd step by hand from our documented init: k distinct points, sorted indices
    rng = np.random.default_rng(3)
    init = x[np.sort(rng.choice(len(x), 10, replace=False))]
    idx = faiss.IndexFlatL2(16)
    idx.add(init)
    lab = idx.search(x, 1)[1][:, 0]
    ref = np.stack([x[lab == j].astype(np.float64).mean(0) for j in range(10)])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_empty_clusters_are_split():
    # 5 distinct points repeated, 8 centres: duplicates in the init leave clusters empty
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((5, 4)).astype(np.float32)
    x = np.repeat(pts, 40, axis=0)
    c = train_kmeans(x, 8, niter=4, seed=0, device="cpu").centroids
    assert np.isfinite(c).all() and c.shape == (8, 4)


def test_k_larger_than_samples_is_a_user_error():
    with pytest.raises(UserError, match="n_centers = 50"):
        train_kmeans(np.zeros((10, 3), np.float32), 50, 2, 0)
    with pytest.raises(UserError, match="kmeans mode"):
        train_kmeans(np.zeros((10, 3), np.float32), 2, 2, 0, mode="fast")


def test_exact_assignment_against_brute_force():
    rng = np.random.default_rng(5)
    c = rng.standard_normal((300, 24)).astype(np.float32)
    x = rng.standard_normal((2000, 24)).astype(np.float32)
    cb = Codebook(c)
    w = cb.assign(x)
    assert w.dtype == np.int64 and cb.k == 300 and cb.dim == 24
    np.testing.assert_array_equal(w, _brute(x, c))
    assert cb.assign(np.zeros((0, 24), np.float32)).shape == (0,)
    with pytest.raises(UserError, match="24-D"):
        cb.assign(np.zeros((3, 12), np.float32))


def _isotropic(n: int, d: int, seed: int) -> np.ndarray:
    """L2-normalised Gaussian rows: whitened conv features are close to isotropic, the
    hard case for approximate nearest-neighbour search."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_approximate_assignment_agrees_after_tuning():
    from lib.vocabulary.codebook import APPROX_MIN_K, CANDIDATE_LADDER

    cents = _isotropic(2000, 36, 1) * 1.1  # 36-D: 36 sub-quantisers of 1-D
    x = _isotropic(6000, 36, 2)
    assert len(cents) >= APPROX_MIN_K
    cb = Codebook(cents, mode="approximate")
    agree = cb.tune(x[:2000], target=0.97)
    assert agree >= 0.97 and cb.n_candidates in CANDIDATE_LADDER
    assert cb.n_candidates < len(cents) // 4  # a real shortlist, not brute force
    w = cb.assign(x[2000:])
    assert np.mean(w == _brute(x[2000:], cents)) >= 0.95
    # deterministic: a rebuilt index, other chunk boundaries and one thread give the same
    faiss = pytest.importorskip("faiss")
    cb2 = Codebook(cents, mode="approximate")
    cb2.n_candidates = cb.n_candidates
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        parts = [cb2.assign(x[s:s + 777]) for s in range(2000, 6000, 777)]
    finally:
        faiss.omp_set_num_threads(old)
    np.testing.assert_array_equal(np.concatenate(parts), w)


def test_approximate_with_full_shortlist_is_exact():
    # re-ranking every word exactly must give the brute-force answer (padding included)
    cents = _isotropic(1500, 99, 3)  # 99-D: padded to 100 (2-D sub-quantisers)
    x = _isotropic(800, 99, 4)
    cb = Codebook(cents, mode="approximate")
    cb.n_candidates = len(cents)
    np.testing.assert_array_equal(cb.assign(x), _brute(x, cents))


def test_small_codebooks_assign_exactly_in_approximate_mode():
    x, _ = _blobs(500, d=8, k=5, seed=9)
    c = x[:300]
    cb = Codebook(c, mode="approximate")
    np.testing.assert_array_equal(cb.assign(x), _brute(x, c))
    assert cb.tune(x[:100]) == 1.0


def test_approximate_kmeans_reproducible_and_close_to_exact():
    x = _isotropic(6000, 64, 5)
    a = train_kmeans(x, 1100, niter=3, seed=2, mode="approximate").centroids
    b = train_kmeans(x, 1100, niter=3, seed=2, mode="approximate").centroids
    np.testing.assert_array_equal(a, b)
    e = train_kmeans(x, 1100, niter=3, seed=2, mode="exact", device="cpu").centroids
    assert not np.array_equal(a, e)  # the shortlist path really ran
    assert kmeans_objective(x, a) <= 1.02 * kmeans_objective(x, e)


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    cb = Codebook(rng.standard_normal((50, 8)).astype(np.float32))
    p = tmp_path / "codebook.npy"
    cb.save(p, {"provenance": {"layers": ["conv5_1"]}, "seed": 0})
    meta = json.loads((tmp_path / "codebook.json").read_text())
    assert meta["n_centers"] == 50 and meta["codebook_hash"] == cb.content_hash()
    back = Codebook.load(p, mode="approximate")
    assert back.mode == "approximate" and back.meta["provenance"]["layers"] == ["conv5_1"]
    np.testing.assert_array_equal(back.centroids, cb.centroids)
    np.save(tmp_path / "bad.npy", np.zeros((4, 4), np.float64))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="float32"):
        Codebook.load(tmp_path / "bad.npy")



def _brute_k(x: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    d = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def test_nearest_words_exact_and_approximate():
    """ASMK's query multiple assignment: the k nearest words, nearest first."""
    cents = _isotropic(1500, 36, 5)
    x = _isotropic(400, 36, 6)
    ref = _brute_k(x, cents, 5)
    np.testing.assert_array_equal(Codebook(cents).nearest(x, 5), ref)
    approx = Codebook(cents, mode="approximate")
    approx.n_candidates = len(cents)  # a shortlist of every word: exactly the brute force
    np.testing.assert_array_equal(approx.nearest(x, 5), ref)
    approx.n_candidates = 64
    got = approx.nearest(x, 5)
    assert np.mean(got[:, 0] == ref[:, 0]) >= 0.9
    np.testing.assert_array_equal(Codebook(cents).nearest(x, 1)[:, 0], _brute(x, cents))
    with pytest.raises(UserError):
        Codebook(cents).nearest(x, 0)
