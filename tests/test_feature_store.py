"""The LMDB feature store (lib/features/feature_store.py): value layout, round trips,
metadata, growth."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from lib.errors import UserError
from lib.features import feature_store as fs
from lib.features.feature_store import (
    FeatureStore,
    corrupted_path,
    decode_record,
    encode_record,
    read_corrupted,
    write_corrupted,
)


def _maps(seed: int, c: int = 4, h: int = 3, w: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.random((c, h, w), dtype=np.float32),
            "b": rng.random((2 * c, h + 1, w + 2), dtype=np.float32)}


def test_value_layout_is_the_documented_one():
    m = _maps(0)
    buf = encode_record(m, (480, 640), "float16")
    magic, code, n, reserved, h0, w0 = struct.unpack_from("<4sBBHII", buf, 0)
    assert (magic, code, n, reserved, h0, w0) == (b"LCF2", 1, 2, 0, 480, 640)
    assert struct.unpack_from("<III", buf, 16) == (4, 3, 2)
    assert struct.unpack_from("<III", buf, 28) == (8, 4, 4)
    first = np.frombuffer(buf, "<f2", count=24, offset=40).reshape(4, 3, 2)
    assert np.array_equal(first, m["a"].astype(np.float16))
    # the maps, then the little-endian CRC-32 of every byte before the trailer
    assert len(buf) == 40 + 2 * (24 + 128) + 4
    assert struct.unpack_from("<I", buf, len(buf) - 4)[0] == zlib.crc32(buf[:-4])
    maps, size = decode_record(encode_record(m, (5, 7), "float32"))
    assert size == (5, 7) and all(x.dtype == np.float32 for x in maps)
    assert np.array_equal(maps[0], m["a"]) and np.array_equal(maps[1], m["b"])
    with pytest.raises(UserError, match="not a feature record"):
        decode_record(b"XXXX" + buf[4:])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_store_round_trip(tmp_path, dtype):
    path = tmp_path / "s.lmdb"
    meta = {"layers": ["a", "b"], "feature_dtype": dtype, "count": 0}
    with FeatureStore.create(path, meta) as st:
        st.put_many([("img/2", _maps(2), (30, 20)), ("img/1", _maps(1), (20, 30))])
        st.put_many([("z", _maps(3), (1, 1))])
    with FeatureStore(path) as st:
        assert st.ids() == ["img/1", "img/2", "z"] and len(st) == 3
        assert "img/1" in st and "nope" not in st and st.meta["feature_dtype"] == dtype
        maps, size = st.get("img/2")
        assert size == (30, 20) and list(maps) == ["a", "b"]
        tol = 1e-3 if dtype == "float16" else 0
        assert np.allclose(maps["b"], _maps(2)["b"], atol=tol)
        assert st.sizes() == {"img/1": (20, 30), "img/2": (30, 20), "z": (1, 1)}
        with pytest.raises(UserError, match="'missing' not in the feature store"):
            st.get("missing")
        with pytest.raises(UserError, match="read-only"):
            st.put_many([("q", _maps(0), (1, 1))])


def test_missing_store_and_map_growth(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="feature store not found"):
        FeatureStore(tmp_path / "none.lmdb")
    monkeypatch.setattr(fs, "_INITIAL_MAP", 1 << 16)  # 64 KiB: forces several doublings
    big = {"a": np.ones((64, 32, 32), np.float32), "b": np.zeros((1, 1, 1), np.float32)}
    with FeatureStore.create(tmp_path / "g.lmdb", {"layers": ["a", "b"],
                                                   "feature_dtype": "float32"}) as st:
        st.put_many([(f"i{k}", big, (2, 2)) for k in range(4)])  # 1 MiB in one transaction
        assert len(st) == 4
    with FeatureStore(tmp_path / "g.lmdb") as st:
        assert np.array_equal(st.get("i3")[0]["a"], big["a"])


def test_path_for_and_corrupted_list(tmp_path):
    s = {"network": "vgg16", "weights": "default", "layers": ["conv5_1", "conv5_2"],
         "input_size": [336, 256], "resize": "fixed", "max_side": 1024,
         "path_features": tmp_path}
    assert FeatureStore.path_for(s) == tmp_path / "vgg16-caffe-conv5_1+conv5_2-336x256-fixed.lmdb"
    s2 = {**s, "resize": "max_side", "max_side": 768}
    assert FeatureStore.path_for(s2).name.endswith("-max_side768.lmdb")
    p = tmp_path / "x.lmdb"
    assert corrupted_path(p) == tmp_path / "x.corrupted.txt"
    write_corrupted(p, [("b", "truncated\nfile"), ("a", "zero-byte file")])
    assert corrupted_path(p).read_text() == "a\tzero-byte file\nb\ttruncated file\n"
    assert read_corrupted(p) == {"a": "zero-byte file", "b": "truncated file"}
