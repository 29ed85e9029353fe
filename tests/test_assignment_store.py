"""The assignment-map LMDB store: layout, dtypes, metadata, batch writes, errors."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from lib.errors import UserError
from lib.index.assignment_store import HEADER, AssignmentStore
from lib.index.encoding import word_dtype


def test_roundtrip_and_layout(tmp_path):
    path = tmp_path / "assignments.lmdb"
    rng = np.random.default_rng(0)
    a = rng.integers(0, 25000, (42, 32)).astype(word_dtype(25000))
    b = rng.integers(0, 70000, (32, 42)).astype(word_dtype(70000))
    with AssignmentStore.create(path, {"n_centers": 25000, "new_dim": [42, 32]}) as st:
        st.put_many([("oxc/a_1", a, (1024, 768)), ("b", b, (600, 800))])
        assert len(st) == 2 and "b" in st and "__meta__" not in st and "zzz" not in st
    with AssignmentStore(path) as st:
        assert st.meta == {"n_centers": 25000, "new_dim": [42, 32]}
        assert st.checksummed  # a new store: record_checksum in __meta__, kept out of meta
        assert st.ids() == ["b", "oxc/a_1"]  # byte order; __meta__ excluded
        wa, hw = st.get("oxc/a_1")
        assert wa.dtype == np.uint16 and hw == (1024, 768)
        np.testing.assert_array_equal(wa, a)
        wb, hw = st.get("b")
        assert wb.dtype == np.uint32 and wb.shape == (32, 42) and hw == (600, 800)
        np.testing.assert_array_equal(wb, b)
        # the documented value layout: 24-byte header, the row-major map, the CRC-32
        with st.env.begin() as txn:
            raw = txn.get(b"oxc/a_1")
            meta = json.loads(txn.get(b"__meta__"))
        assert meta["record_checksum"] == "crc32"
        assert HEADER.size == 24 and len(raw) == 24 + 42 * 32 * 2 + 4
        assert struct.unpack("<4sB3xIIII", raw[:24]) == (b"ASG3", 1, 42, 32, 1024, 768)
        assert np.frombuffer(raw[24:-4], "<u2")[33] == a.ravel()[33]
        assert struct.unpack("<I", raw[-4:])[0] == zlib.crc32(raw[:-4])


def test_reopen_writable_keeps_records_and_overwrites(tmp_path):
    path = tmp_path / "s.lmdb"
    with AssignmentStore.create(path, {"v": 1}) as st:
        st.put_many([("x", np.zeros((2, 3), np.uint16), (4, 6))])
    with AssignmentStore(path, readonly=False) as st:
        assert st.meta == {"v": 1} and "x" in st
        st.put_many([("x", np.ones((2, 3), np.uint16), (4, 6)),
                     ("y", np.ones((1, 1), np.int64), (1, 1))])
    with AssignmentStore(path) as st:
        assert len(st) == 2 and st.get("x")[0].sum() == 6 and st.get("y")[0].dtype == np.uint16


def test_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        AssignmentStore(tmp_path / "missing.lmdb")
    path = tmp_path / "s.lmdb"
    with AssignmentStore.create(path, {}) as st:
        with pytest.raises(UserError, match="reserved"):
            st.put_many([("__meta__", np.zeros((1, 1), np.uint16), (1, 1))])
        with st.env.begin(write=True) as txn:
            txn.put(b"bad", b"XXXX" + bytes(30))
    with AssignmentStore(path) as st:
        with pytest.raises(UserError, match="image 'nope'"):
            st.get("nope")
        with pytest.raises(UserError, match="bad"):
            st.get("bad")
        with pytest.raises(RuntimeError, match="read-only"):
            st.put_many([])
