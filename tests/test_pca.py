"""PCA-whitening against a direct computation, sklearn parity, and its file format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lib.errors import UserError
from lib.vocabulary.pca import PCAWhitening


def _data(n: int = 600, d: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.linspace(3, 0.2, d)[None, :]
    return (rng.standard_normal((n, d)) @ mix + rng.standard_normal(d)).astype(np.float32)


def test_fit_matches_direct_eigendecomposition():
    x = _data()
    pca = PCAWhitening.fit(x, 8, whiten=True)
    x64 = x.astype(np.float64)
    mu = x64.mean(0)
    cov = (x64 - mu).T @ (x64 - mu) / (len(x) - 1)
    vals, vecs = np.linalg.eigh(cov)
    vals, vecs = vals[::-1][:8], vecs[:, ::-1][:, :8]
    np.testing.assert_allclose(pca.mean, mu, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(pca.variances, vals, rtol=1e-9)
    # components equal the eigenvectors up to sign
    np.testing.assert_allclose(np.abs(pca.components @ vecs), np.eye(8), atol=1e-8)
    y = pca.transform(x)
    assert y.dtype == np.float32 and y.shape == (len(x), 8)
    # whitened output: zero mean, identity covariance
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(y.astype(np.float64), rowvar=False), np.eye(8), atol=1e-4)


def test_matches_sklearn_whitened_pca():
    sk = pytest.importorskip("sklearn.decomposition")
    x = _data(400, 10, seed=3).astype(np.float64)
    ours = PCAWhitening.fit(x, 10, whiten=True)
    ref = sk.PCA(n_components=10, whiten=True, svd_solver="full").fit(x)
    np.testing.assert_allclose(ours.variances, ref.explained_variance_, rtol=1e-8)
    a, b = ours.transform(x), ref.transform(x)
    signs = np.sign(np.sum(a * b, axis=0))  # sign conventions may differ per component
    np.testing.assert_allclose(a * signs, b, rtol=1e-3, atol=1e-4)


def test_no_whitening_is_a_rotation():
    x = _data(300, 6, seed=1)
    pca = PCAWhitening.fit(x, 6, whiten=False)
    y = pca.transform(x).astype(np.float64)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(xc, axis=1),
                               rtol=1e-4)


def test_dead_dimensions_do_not_explode():
    x = _data(200, 6)
    x[:, 2] = 0.0  # a channel that never fires (dead ReLU)
    pca = PCAWhitening.fit(x, 6)
    y = pca.transform(x)
    assert np.isfinite(y).all() and pca.variances[-1] < 1e-10
    # the dead component carries only rounding noise; whitening must not blow it up to
    # the size of the real (unit-variance) components
    assert np.abs(y[:, -1]).max() < 1e-2
    np.testing.assert_allclose(y[:, :5].std(0, ddof=1), 1.0, rtol=1e-3)


def test_save_load_roundtrip_without_pickle(tmp_path):
    x = _data()
    pca = PCAWhitening.fit(x, 5)
    p = tmp_path / "models" / "pca.npz"
    pca.save(p, {"provenance": {"network": "vgg16"}, "seed": 0})
    side = json.loads((tmp_path / "models" / "pca.json").read_text())
    assert side["pca_hash"] == pca.content_hash() and side["pca_dim"] == 5
    with np.load(p, allow_pickle=False) as z:
        assert set(z.files) == {"mean", "components", "variances", "whiten"}
    back = PCAWhitening.load(p)
    assert back.whiten and back.meta["provenance"] == {"network": "vgg16"}
    np.testing.assert_array_equal(back.transform(x), pca.transform(x))
    assert back.content_hash() == pca.content_hash()


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="pca_dim"):
        PCAWhitening.fit(_data(50, 4), 8)
    with pytest.raises(UserError, match="PCA needs"):
        PCAWhitening.fit(_data(3, 6), 5)
    with pytest.raises(UserError, match="not found"):
        PCAWhitening.load(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="unreadable"):
        PCAWhitening.load(tmp_path / "bad.npz")
    pca = PCAWhitening.fit(_data(), 4)
    with pytest.raises(UserError, match="12-D"):
        pca.transform(np.zeros((3, 7), np.float32))


def test_fit_does_not_depend_on_the_blas_thread_count():
    # bug: two runs with the same seed gave PCA arrays differing in the last bits (and so
    # different pca_hash values downstream) because BLAS reductions depend on threads
    from threadpoolctl import threadpool_limits

    from lib.vocabulary.pca import PCAWhitening

    x = np.random.default_rng(5).standard_normal((4000, 64)).astype(np.float32)
    with threadpool_limits(limits=1):
        a = PCAWhitening.fit(x, 32)
    with threadpool_limits(limits=2):
        b = PCAWhitening.fit(x, 32)
    assert a.content_hash() == b.content_hash()
