"""The reader: upsampling geometry, row-major flattening, L2-PCA-L2, sampling, pooling,
and the absence of the original's multi-layer bugs (lib/features/local_features.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lib.errors import UserError
from lib.features.feature_store import FeatureStore
from lib.features.local_features import LocalFeatureReader, l2n, maps_to_features, upsample


def test_l2n_keeps_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    assert np.allclose(l2n(x), [[0.6, 0.8], [0, 0]])
    assert np.allclose(l2n(x.T, axis=0), [[0.6, 0], [0.8, 0]])


def test_upsample_is_aligned_corners_bilinear():
    rng = np.random.default_rng(0)
    m = rng.random((3, 21, 16), dtype=np.float32)
    up = upsample(m, (42, 32))
    assert up.shape == (3, 42, 32)
    # corners map onto corners; the original used scipy zoom(order=1), same geometry
    assert np.allclose(up[:, [0, 0, -1, -1], [0, -1, 0, -1]], m[:, [0, 0, -1, -1], [0, -1, 0, -1]])
    ref = np.stack([ndimage.zoom(c, (42 / 21, 32 / 16), order=1) for c in m])
    assert np.allclose(up, ref, atol=1e-5)
    ramp = np.arange(4, dtype=np.float32)[None, None, :].repeat(2, 1)
    assert np.allclose(upsample(ramp, (2, 7))[0, 0], np.linspace(0, 3, 7))


def test_maps_to_features_row_major_and_pca():
    m = np.random.default_rng(1).random((5, 3, 4), dtype=np.float32)
    f = maps_to_features(m, l2norm=False)
    assert f.shape == (12, 5) and f.dtype == np.float32
    r, c = 2, 1
    assert np.array_equal(f[r * 4 + c], m[:, r, c])

    class Scale:  # any object with .transform
        def transform(self, x):
            return x[:, :3] * np.array([1.0, 2.0, -1.0])

    g = maps_to_features(m, l2norm=True, pca=Scale())
    v = l2n(m[:, r, c])[:3] * [1.0, 2.0, -1.0]
    assert g.shape == (12, 3) and np.allclose(g[r * 4 + c], v / np.linalg.norm(v), atol=1e-6)
    assert np.allclose(np.linalg.norm(g, axis=1), 1)


@pytest.fixture()
def store(tmp_path):
    """Two layers of different resolution, a portrait and a landscape image."""
    rng = np.random.default_rng(2)
    meta = {"layers": ["fine", "coarse"], "feature_dtype": "float32"}
    recs = {
        "portrait": {"fine": rng.random((4, 6, 4), dtype=np.float32),
                     "coarse": rng.random((2, 3, 2), dtype=np.float32)},
        "landscape": {"fine": rng.random((4, 4, 6), dtype=np.float32),
                      "coarse": rng.random((2, 2, 3), dtype=np.float32)},
    }
    with FeatureStore.create(tmp_path / "s.lmdb", meta) as st:
        st.put_many([("portrait", recs["portrait"], (96, 64)),
                     ("landscape", recs["landscape"], (64, 96))])
    st = FeatureStore(tmp_path / "s.lmdb")
    yield st, recs
    st.close()


def test_multilayer_orientation_concat_and_upsampling(store):
    st, recs = store
    r = LocalFeatureReader(st, new_dim=(12, 8), l2norm=False)
    for name, hw in (("portrait", (12, 8)), ("landscape", (8, 12))):
        m = r.maps(name)
        assert m.shape == (6, *hw)  # C = 4 + 2; both layers get the SAME orientation
        fine = recs[name]["fine"]
        coarse_up = upsample(recs[name]["coarse"], fine.shape[1:])
        assert np.allclose(m, upsample(np.concatenate([fine, coarse_up]), hw), atol=1e-6)
    native = LocalFeatureReader(st, new_dim=None, l2norm=False, layers=["coarse"])
    assert native.maps("landscape").shape == (2, 2, 3)
    f, shape = LocalFeatureReader(st, (12, 8)).features_and_shape("landscape")
    assert shape == (8, 12) and f.shape == (96, 6)
    with pytest.raises(UserError, match="layer 'x' not stored"):
        LocalFeatureReader(st, None, layers=["x"])


def test_pooling_covers_every_layer(store):
    st, _ = store
    r = LocalFeatureReader(st, new_dim=None, l2norm=False)
    m = r.maps("portrait")
    assert np.allclose(r.pool("portrait", "sum"), m.sum((1, 2)), rtol=1e-5)
    assert np.allclose(r.pool("portrait", "max"), m.max((1, 2)))
    p = 3.0
    gem = np.mean(np.clip(m, 1e-6, None) ** p, axis=(1, 2)) ** (1 / p)
    assert np.allclose(r.pool("portrait", "gem", p), gem, rtol=1e-5)
    # the original re-pooled layer 0 for every layer: the coarse part must differ from it
    assert not np.allclose(r.pool("portrait")[4:], r.pool("portrait")[:2])
    v = LocalFeatureReader(st, None, l2norm=True).pool("portrait", "sum")
    assert np.isclose(np.linalg.norm(v), 1) and np.allclose(v, l2n(m.sum((1, 2))), atol=1e-6)


def test_seeded_sampling(store):
    st, _ = store
    r = LocalFeatureReader(st, new_dim=(12, 8))
    full = r.features("portrait")
    a = r.features("portrait", 10, np.random.default_rng(5))
    b = r.features("portrait", 10, np.random.default_rng(5))
    c = r.features("portrait", 10, np.random.default_rng(6))
    assert a.shape == (10, 6) and np.array_equal(a, b) and not np.array_equal(a, c)
    rows = {tuple(x) for x in full}
    assert all(tuple(x) in rows for x in a) and len({tuple(x) for x in a}) == 10
    assert r.features("portrait", 1000).shape == full.shape  # more than available: all
