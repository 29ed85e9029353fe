"""Per-record CRC-32 checksums in the two LMDB stores (issue 19, item 13).

LMDB checksums nothing and the decoders used to check only headers, shapes and lengths,
so most flipped bits inside a record decoded silently. New records (``LCF2``, ``ASG3``,
``ASG4``) end in the CRC-32 of every byte before it, verified on every full decode; a
store created with them says so in ``__meta__`` (``record_checksum``) and then refuses
an old magic. Old records (``LCF1``, ``ASG1``, ``ASG2``) keep decoding, unverified, and
a resumed old store gets new-format records without gaining the key.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from lib.errors import UserError
from lib.features import feature_store as fs
from lib.features.feature_store import FeatureStore, decode_record, encode_record
from lib.index import assignment_store as asg
from lib.index.assignment_store import AssignmentStore
from tests.helpers_pipeline import assert_one_error, call_step, load, make_dataset, refusal

WHERE = "s.lmdb: image 'Canon/001'"


def _maps(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((3, 4, 2), dtype=np.float32), rng.random((2, 2, 3), dtype=np.float32)]


def _words(seed: int = 0, k: int = 70000) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, (5, 3)).astype(
        np.uint16 if k <= 65536 else np.uint32)


def _signature() -> asg.Signature:
    return (np.array([3, 9, 11], np.uint32), np.arange(12, dtype=np.uint8).reshape(3, 4))


def _old(rec: bytes) -> bytes:
    """The same record in the format before the trailer (old magic, no CRC-32)."""
    old = {b"LCF2": b"LCF1", b"ASG3": b"ASG1", b"ASG4": b"ASG2"}[rec[:4]]
    return old + rec[4:-4]


def _flip(buf: bytes, bit: int) -> bytes:
    b = bytearray(buf)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def _feature_record(dtype: str = "float16") -> bytes:
    return encode_record(_maps(), (480, 640), dtype)


def _assignment_record(signature: bool, k: int = 25000) -> bytes:
    return asg.encode(_words(1, k), (1024, 768), _signature() if signature else None)


# ------------------------------------------------------------------------ the format


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_feature_record_round_trip_and_trailer(dtype):
    rec = _feature_record(dtype)
    assert rec[:4] == b"LCF2"
    assert struct.unpack("<I", rec[-4:])[0] == zlib.crc32(rec[:-4])
    # the maps sit where LCF1 put them: the trailer only follows them
    assert len(rec) == len(_old(rec)) + 4
    for buf in (rec, memoryview(rec)):  # bytes, and the LMDB buffer type (zero-copy)
        maps, hw = decode_record(buf, WHERE)
        assert hw == (480, 640)
        for got, want in zip(maps, _maps()):
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want.astype(dtype).astype(np.float32))


@pytest.mark.parametrize("signature", [False, True])
@pytest.mark.parametrize("k", [25000, 70000])
def test_assignment_record_round_trip_and_trailer(signature, k):
    rec = _assignment_record(signature, k)
    assert rec[:4] == (b"ASG4" if signature else b"ASG3")
    assert struct.unpack("<I", rec[-4:])[0] == zlib.crc32(rec[:-4])
    for buf in (rec, memoryview(rec)):
        words, hw = asg.decode(buf, WHERE)
        np.testing.assert_array_equal(words, _words(1, k))
        assert hw == (1024, 768) and words.dtype == _words(1, k).dtype
        sig = asg.decode_signature(buf, WHERE)
        if signature:
            np.testing.assert_array_equal(sig[0], _signature()[0])
            np.testing.assert_array_equal(sig[1], _signature()[1])
        else:
            assert sig is None


def _every_flip_refused(rec: bytes, decoders) -> None:
    """Every single-bit flip of ``rec`` raises a one-line UserError naming the record,
    with and without ``require_checksum``; outside the magic it is the CRC-32."""
    n_crc = 0
    for bit in range(len(rec) * 8):
        bad = _flip(rec, bit)
        for decode in decoders:
            for require in (False, True):
                with pytest.raises(UserError) as e:
                    decode(memoryview(bad), WHERE, require)
                line = str(e.value)
                assert WHERE in line and "\n" not in line, line
                if bit >= 32:
                    assert "CRC-32 mismatch" in line and "rerun step" in line, line
                    n_crc += 1
    assert n_crc


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_bit_flip_in_a_feature_record_is_refused(dtype):
    _every_flip_refused(_feature_record(dtype), [decode_record])


@pytest.mark.parametrize("signature", [False, True])
def test_every_bit_flip_in_an_assignment_record_is_refused(signature):
    decoders = [asg.decode] + ([asg.decode_signature] if signature else [])
    _every_flip_refused(_assignment_record(signature), decoders)


def test_truncated_or_extended_new_records_are_refused():
    for rec, decode in ((_feature_record(), decode_record),
                        (_assignment_record(True), asg.decode),
                        (_assignment_record(False), asg.decode)):
        for bad in (rec[:-1], rec[:-4], rec[:28], rec + b"\0", rec[:-4] + b"\0" * 8):
            with pytest.raises(UserError, match="Canon/001"):
                decode(bad, WHERE)


def test_old_records_still_decode_unverified():
    for dtype in ("float16", "float32"):
        rec = _feature_record(dtype)
        old = _old(rec)
        assert old[:4] == b"LCF1"
        got, hw = decode_record(old, WHERE)
        want, _ = decode_record(rec, WHERE)
        assert hw == (480, 640) and all(np.array_equal(a, b) for a, b in zip(got, want))
    for signature in (False, True):
        rec = _assignment_record(signature)
        old = _old(rec)
        assert old[:4] == (b"ASG2" if signature else b"ASG1")
        np.testing.assert_array_equal(asg.decode(old, WHERE)[0], asg.decode(rec, WHERE)[0])
        s_old, s_new = asg.decode_signature(old, WHERE), asg.decode_signature(rec, WHERE)
        assert (s_old is None) == (s_new is None)
        if signature:
            assert s_old[1].tobytes() == s_new[1].tobytes()
    # the old checks still stand: a new record read as an old one has 4 trailing bytes
    with pytest.raises(UserError, match="trailing bytes"):
        decode_record(b"LCF1" + _feature_record()[4:], WHERE)
    with pytest.raises(UserError, match="bytes, expected"):
        asg.decode(b"ASG1" + _assignment_record(False)[4:], WHERE)


def test_require_checksum_refuses_old_magics():
    for old, decode in ((_old(_feature_record()), decode_record),
                        (_old(_assignment_record(False)), asg.decode),
                        (_old(_assignment_record(True)), asg.decode_signature)):
        with pytest.raises(UserError) as e:
            decode(old, WHERE, True)
        line = str(e.value)
        assert WHERE in line and "no CRC-32 trailer" in line and "\n" not in line, line


# ------------------------------------------------------------------------ the stores


def _raw_meta(path: Path) -> dict:
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            return json.loads(bytes(txn.get(b"__meta__")))
    finally:
        env.close()


def _put_raw(env, items: dict[bytes, bytes]) -> None:
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k, v)


FMETA = {"layers": ["a", "b"], "feature_dtype": "float16", "count": 0}


def _feature_put(st: FeatureStore, image_id: str, seed: int) -> None:
    m = _maps(seed)
    st.put_many([(image_id, {"a": m[0], "b": m[1]}, (20, 30))])


def test_new_stores_record_the_checksum_and_refuse_old_magics(tmp_path):
    fpath, apath = tmp_path / "f.lmdb", tmp_path / "a.lmdb"
    with FeatureStore.create(fpath, FMETA) as st:
        _feature_put(st, "Canon/001", 0)
        assert st.checksummed and "record_checksum" not in st.meta
        # a caller's meta (the resume path rewrites it whole) cannot drop the key
        st.set_meta({**FMETA, "count": 1, "record_checksum": None})
        raw = st.get_raw("Canon/001")
        _put_raw(st.env, {b"old": _old(raw)})
    assert _raw_meta(fpath)["record_checksum"] == "crc32"
    with FeatureStore(fpath) as st:
        assert st.meta == {**FMETA, "count": 1} and st.checksummed
        assert st.get("Canon/001")[1] == (20, 30)
        with pytest.raises(UserError) as e:
            st.get("old")
        assert_one_error(e.value, str(fpath), "'old'", "no CRC-32 trailer", "step A")

    with AssignmentStore.create(apath, {"n_centers": 25000}) as st:
        st.put_many([("Canon/001", _words(1, 25000), (4, 6), _signature())])
        with st.env.begin() as txn:
            raw = bytes(txn.get(b"Canon/001"))
        _put_raw(st.env, {b"old": _old(raw)})
    assert _raw_meta(apath)["record_checksum"] == "crc32"
    with AssignmentStore(apath) as st:
        assert st.meta == {"n_centers": 25000} and st.checksummed
        assert st.get_signature("Canon/001")[0].tolist() == [3, 9, 11]
        for read in (st.get, st.get_signature):
            with pytest.raises(UserError) as e:
                read("old")
            assert_one_error(e.value, str(apath), "'old'", "no CRC-32 trailer", "step C")


@pytest.mark.parametrize("kind", ["features", "assignments"])
def test_a_flipped_bit_in_a_stored_record_names_the_image(tmp_path, kind):
    """Through ``get`` (and ``get_signature``), on the LMDB buffer: a dense sample of
    byte positions, one bit each."""
    path = tmp_path / "s.lmdb"
    if kind == "features":
        st = FeatureStore.create(path, FMETA)
        _feature_put(st, "Canon/001", 0)
        reads, step = [st.get], "step A"
    else:
        st = AssignmentStore.create(path, {"k": 1})
        st.put_many([("Canon/001", _words(1, 25000), (4, 6), _signature())])
        reads, step = [st.get, st.get_signature], "step C"
    with st.env.begin() as txn:
        good = bytes(txn.get(b"Canon/001"))
    for pos in range(0, len(good), 3):
        _put_raw(st.env, {b"Canon/001": _flip(good, 8 * pos + pos % 8)})
        for read in reads:
            with pytest.raises(UserError) as e:
                read("Canon/001")
            needles = [str(path), "'Canon/001'"] + ([step, "CRC-32"] if pos >= 4 else [])
            assert_one_error(e.value, *needles)
    _put_raw(st.env, {b"Canon/001": good})
    assert reads[0]("Canon/001")[1] in ((20, 30), (4, 6))
    st.close()


def _old_feature_store(path: Path) -> None:
    """A store as the code before the trailer wrote it: LCF1 records, no key in meta."""
    with FeatureStore.create(path, FMETA) as st:
        _feature_put(st, "old/1", 1)
        raw = st.get_raw("old/1")
        _put_raw(st.env, {b"old/1": _old(raw),
                          b"__meta__": json.dumps(FMETA, sort_keys=True).encode()})


def _old_assignment_store(path: Path) -> None:
    with AssignmentStore.create(path, {"k": 1}) as st:
        st.put_many([("old/1", _words(2, 25000), (4, 6), _signature())])
        with st.env.begin() as txn:
            raw = bytes(txn.get(b"old/1"))
        _put_raw(st.env, {b"old/1": _old(raw), b"__meta__": b'{"k": 1}'})


def test_resumed_old_feature_store_writes_verifiable_records(tmp_path):
    path = tmp_path / "f.lmdb"
    _old_feature_store(path)
    with FeatureStore(path) as st:
        assert not st.checksummed and st.get("old/1")[1] == (20, 30)
    # what step A does on a resume: reopen for writing, rewrite the meta, put new records
    with FeatureStore(path, readonly=False) as st:
        st.set_meta({**FMETA, "count": 1})
        _feature_put(st, "new/1", 2)
        st.set_meta({**FMETA, "count": 2})
        new = st.get_raw("new/1")
    assert "record_checksum" not in _raw_meta(path)  # mixed: old records stay unverified
    assert new[:4] == b"LCF2" and struct.unpack("<I", new[-4:])[0] == zlib.crc32(new[:-4])
    with FeatureStore(path) as st:
        assert not st.checksummed and st.ids() == ["new/1", "old/1"]
        assert st.get("old/1")[1] == (20, 30)
        np.testing.assert_array_equal(st.get("new/1")[0]["b"],
                                      _maps(2)[1].astype(np.float16).astype(np.float32))
    with FeatureStore(path, readonly=False) as st:  # a bad new record is still caught
        _put_raw(st.env, {b"new/1": _flip(new, 8 * 100)})
    with FeatureStore(path) as st, pytest.raises(UserError, match="'new/1' is corrupt"):
        st.get("new/1")
    # emptied (every old record re-extracted), the store gains the key
    with FeatureStore(path, readonly=False) as st:
        st.replace_inputs({}, drop=["old/1", "new/1"])
        st.set_meta({**FMETA, "count": 0})
        assert st.checksummed
    assert _raw_meta(path)["record_checksum"] == "crc32"


def test_resumed_old_assignment_store_writes_verifiable_records(tmp_path):
    path = tmp_path / "a.lmdb"
    _old_assignment_store(path)
    with AssignmentStore(path, readonly=False) as st:
        assert not st.checksummed and st.get_signature("old/1")[0].tolist() == [3, 9, 11]
        st.put_many([("new/1", _words(3, 25000), (4, 6))])
        st.set_meta({**st.meta, "count": 2})  # as step C does after a resume
        with st.env.begin() as txn:
            new = bytes(txn.get(b"new/1"))
    assert _raw_meta(path) == {"k": 1, "count": 2}
    assert new[:4] == b"ASG3" and struct.unpack("<I", new[-4:])[0] == zlib.crc32(new[:-4])
    with AssignmentStore(path) as st:
        np.testing.assert_array_equal(st.get("new/1")[0], _words(3, 25000))
        assert st.get("old/1")[1] == (4, 6)


@pytest.mark.parametrize("kind", ["features", "assignments"])
def test_unknown_record_checksum_is_refused(tmp_path, kind):
    path = tmp_path / "s.lmdb"
    if kind == "features":
        st = FeatureStore.create(path, FMETA)
        _put_raw(st.env, {b"__meta__": json.dumps({**FMETA, "record_checksum": "xxh3"})
                          .encode()})
        st.close()
        with pytest.raises(UserError, match="'xxh3' checksum"):
            _ = FeatureStore(path).meta
    else:
        st = AssignmentStore.create(path, {})
        _put_raw(st.env, {b"__meta__": b'{"record_checksum": "xxh3"}'})
        st.close()
        with pytest.raises(UserError, match="'xxh3' checksum"):
            AssignmentStore(path)


def test_record_size_hw_stays_header_only():
    rec = _feature_record()
    bad = _flip(rec, 8 * 40)  # in the maps: the header is intact
    assert fs.record_size_hw(memoryview(bad)) == (480, 640)


# ------------------------------------------------------------------------ end to end


def test_a_damaged_feature_record_stops_b_and_c_and_a_resume_recreates_it(tmp_path):
    """One flipped bit inside one stored map: steps C and B stop with one line naming
    the store and the image; deleting that key and rerunning step A extracts only that
    image, bit for bit as before, and the pipeline goes on."""
    settings = make_dataset(tmp_path)
    call_step("A", settings)
    call_step("B", settings)
    store_path = FeatureStore.path_for(load(settings))
    victim = "img_05"
    with FeatureStore(store_path, readonly=False) as st:
        assert st.checksummed
        good = st.get_raw(victim)
        _put_raw(st.env, {victim.encode(): _flip(good, 8 * (len(good) // 2) + 3)})
        ids = st.ids()

    for e in (refusal("C", settings),
              refusal("B", settings, "pca_dim=7")):  # other models: B reads the store
        assert_one_error(e, store_path.name, f"'{victim}'", "CRC-32 mismatch",
                         "rerun step A")

    with FeatureStore(store_path, readonly=False) as st, st.env.begin(write=True) as txn:
        assert txn.delete(victim.encode())
    res = call_step("A", settings)
    assert res.counts["extracted"] == 1 and res.counts["skipped"] == len(ids) - 1
    with FeatureStore(store_path) as st:
        assert st.ids() == ids and st.get_raw(victim) == good
    call_step("C", settings)
    shutil.rmtree(tmp_path / "run" / "models")
    call_step("B", settings)
