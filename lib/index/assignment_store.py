"""LMDB store of assignment maps (step C writes it; D re-ranks and E reports from it).

Why LMDB: one memory-mapped file with transactional batch writes, so step C resumes
after a crash exactly where it stopped, and random access by image id is cheap for
re-ranking. The original kept an int32 LevelDB value without its shape; here the value
carries its shape and the original image size.

Layout: key = image id (UTF-8). Value = 24-byte little-endian header
``<4s B 3x I I I I>``: magic ``ASG3``, dtype code (1 = uint16, 2 = uint32), map height H,
map width W, original image height H0 and width W0 (after EXIF orientation), followed by
the H x W word map, row-major, in that dtype (uint16 when K <= 65,536). With
``kernel = asmk`` the magic is ``ASG4`` and the map is followed by the image's ASMK
signatures: ``<I I>`` m (distinct words) and n (bytes per signature), m uint32 word ids
(ascending), then m x n signature bytes (lib/index/asmk.py). Last comes a 4-byte
``<I>`` trailer, the CRC-32 (``zlib.crc32``) of every byte before it. Records written
before the trailer existed (``ASG1``, ``ASG2``: the same layouts without it) still
decode, unverified. The reserved key ``__meta__`` holds the JSON metadata (feature
provenance, PCA and codebook hashes, new_dim, assignment mode, count) and, in a store
whose records all carry the trailer, ``record_checksum`` = ``"crc32"``.

Why the checksum, and the rules for ``record_checksum`` (set on a new store, never added
to one holding old records, an old magic refused where it is set): as in
:mod:`lib.features.feature_store`. Every full decode (:func:`decode`, and so
:func:`decode_signature`, ``get``, ``get_signature``) verifies the trailer on the LMDB
buffer before reading the shapes; a mismatch names the image, whose key can be deleted
and re-assigned by resuming step C.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from lib.errors import UserError
from lib.features.feature_store import (
    CHECKSUM,
    CHECKSUM_KEY,
    TRAILER,
    checksum_marked,
    open_env,
    payload_size,
    write_growing,
)

MAGIC = b"ASG3"  # a map, then the CRC-32 trailer
MAGIC_SIG = b"ASG4"  # a map followed by its ASMK signatures, then the trailer
MAGIC_V1 = b"ASG1"  # older records: as ASG3 without the trailer
MAGIC_SIG_V1 = b"ASG2"  # older records: as ASG4 without the trailer
_OLD = {MAGIC_V1: MAGIC, MAGIC_SIG_V1: MAGIC_SIG}
SIG_HEADER = struct.Struct("<II")
Signature = tuple[np.ndarray, np.ndarray]  # (words uint32 (m,), signatures uint8 (m, n))
HEADER = struct.Struct("<4sB3xIIII")
META_KEY = b"__meta__"
_CODES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_DTYPE_CODE = {np.dtype("<u2"): 1, np.dtype("<u4"): 2}
# address space reserved at open: twice the file, at least this; doubled when a write
# needs more (a fixed terabyte failed under ``ulimit -v``)
MIN_MAP_SIZE = 64 << 20
_HINT = "delete the folder and rerun step C"


def encode(words: np.ndarray, orig_hw: tuple[int, int],
           signature: Signature | None = None) -> bytes:
    """Header + row-major map (+ the ASMK signatures) + CRC-32 trailer; words must
    already fit their dtype (uint16/uint32)."""
    w = np.asarray(words)
    if w.ndim != 2:
        raise ValueError(f"assignment map must be (H, W), got shape {w.shape}")
    if w.dtype.kind == "u" and w.dtype.itemsize in (2, 4):
        dt = w.dtype.newbyteorder("<")  # the caller chose it from K (encoding.word_dtype)
    else:
        if w.size and int(w.min()) < 0:
            raise ValueError("word ids must be >= 0")
        dt = np.dtype("<u2") if w.size == 0 or int(w.max()) < 65536 else np.dtype("<u4")
    body = np.ascontiguousarray(w, dt).tobytes()
    magic, tail = MAGIC, b""
    if signature is not None:
        uw, sig = np.asarray(signature[0]), np.asarray(signature[1], np.uint8)
        if sig.ndim != 2 or uw.shape != (sig.shape[0],):
            raise ValueError(f"signatures {sig.shape} do not match words {uw.shape}")
        magic = MAGIC_SIG
        tail = (SIG_HEADER.pack(sig.shape[0], sig.shape[1]) + uw.astype("<u4").tobytes()
                + np.ascontiguousarray(sig).tobytes())
    head = HEADER.pack(magic, _DTYPE_CODE[dt], w.shape[0], w.shape[1], int(orig_hw[0]),
                       int(orig_hw[1]))
    crc = zlib.crc32(tail, zlib.crc32(body, zlib.crc32(head)))
    return b"".join((head, body, tail, TRAILER.pack(crc)))


def _check(buf: bytes | memoryview, what: str, require_checksum: bool
           ) -> tuple[bytes, int, int, int, int, int, int]:
    """(layout magic, dtype code, H, W, H0, W0, end of the map) of a whole, verified
    record: the CRC-32 first (new magics), then the length its header implies. Old
    magics are mapped to the new ones' layout (without the trailer)."""
    if len(buf) < HEADER.size:
        raise UserError(f"{what}: truncated assignment record")
    magic, code, h, w, h0, w0 = HEADER.unpack_from(buf)
    size = payload_size(buf, magic, (MAGIC, MAGIC_SIG), _OLD, what, "C", require_checksum)
    if size < 0 or code not in _CODES:
        raise UserError(f"{what}: not an assignment record (magic {magic!r}, dtype {code})")
    layout = _OLD.get(magic, magic)
    end = HEADER.size + h * w * _CODES[code].itemsize
    expected = end + _tail_size(buf, size, end, layout, what)
    if size != expected:
        raise UserError(f"{what}: assignment record has {size} bytes, expected {expected}")
    return layout, code, h, w, h0, w0, end


def decode(buf: bytes | memoryview, what: str, require_checksum: bool = False
           ) -> tuple[np.ndarray, tuple[int, int]]:
    """(words (H, W), (H0, W0)) of one record, verified (see :func:`_check`);
    ``require_checksum`` (a store marked ``record_checksum``) refuses an old magic."""
    _, code, h, w, h0, w0, _ = _check(buf, what, require_checksum)
    return _words_at(buf, code, h, w), (int(h0), int(w0))


def _words_at(buf: bytes | memoryview, code: int, h: int, w: int) -> np.ndarray:
    """The (H, W) word map of a checked record, copied out of the buffer in native
    byte order."""
    dt = _CODES[code]
    words = np.frombuffer(buf, dt, count=h * w, offset=HEADER.size).reshape(h, w)
    return words.astype(dt.newbyteorder("="), copy=True)


def _tail_size(buf: bytes | memoryview, size: int, end: int, magic: bytes, what: str) -> int:
    if magic == MAGIC:
        return 0
    if size < end + SIG_HEADER.size:
        raise UserError(f"{what}: truncated assignment record (signatures)")
    m, n = SIG_HEADER.unpack_from(buf, end)
    return SIG_HEADER.size + 4 * m + m * n


def decode_signature(buf: bytes | memoryview, what: str, require_checksum: bool = False
                     ) -> Signature | None:
    """The ASMK signatures of a record (None for a record without them), verified as
    :func:`decode` verifies."""
    magic, _, _, _, _, _, end = _check(buf, what, require_checksum)
    return _signature_at(buf, magic, end)


def decode_both(buf: bytes | memoryview, what: str, require_checksum: bool = False
                ) -> tuple[np.ndarray, tuple[int, int], Signature | None]:
    """:func:`decode` and :func:`decode_signature` of one record with one verification
    (step C's ASMK pass with BoW weights reads both of every image)."""
    magic, code, h, w, h0, w0, end = _check(buf, what, require_checksum)
    return _words_at(buf, code, h, w), (int(h0), int(w0)), _signature_at(buf, magic, end)


def _signature_at(buf: bytes | memoryview, magic: bytes, end: int) -> Signature | None:
    if magic != MAGIC_SIG:
        return None
    m, n = SIG_HEADER.unpack_from(buf, end)
    o = end + SIG_HEADER.size
    uw = np.frombuffer(buf, "<u4", m, o).astype(np.uint32)
    sig = np.frombuffer(buf, np.uint8, m * n, o + 4 * m).reshape(m, n).copy()
    return uw, sig


class AssignmentStore:
    """Assignment maps keyed by image id. Open read-only by default; ``create`` (or
    ``readonly=False``) for writing. Use as a context manager."""

    def __init__(self, path: Path, readonly: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly and not (self.path / "data.mdb").exists():
            raise UserError(f"{self.path}: assignment store not found (run step C)")
        self.path.mkdir(parents=True, exist_ok=True)
        # checks data.mdb against its own size record first (a truncated file would
        # kill the process with SIGBUS on the first read of a missing page)
        self.env = open_env(self.path, "assignment store", _HINT, readonly=readonly,
                            lock=not readonly, minimum=MIN_MAP_SIZE, max_dbs=0)
        with self.env.begin() as txn:
            raw = txn.get(META_KEY)
        try:
            meta = json.loads(bytes(raw).decode("utf-8")) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{self.path}: corrupt __meta__ record") from None
        # record_checksum is the store's own (see the module doc), not the caller's: kept
        # out of ``meta`` so that comparisons of metadata do not depend on the format
        self.checksummed = checksum_marked(meta, str(self.path))
        meta.pop(CHECKSUM_KEY, None)
        self.meta: dict[str, Any] = meta

    @staticmethod
    def path_for(settings: Any) -> Path:
        return Path(settings["path_output"]) / "assignments.lmdb"

    @classmethod
    def create(cls, path: Path, meta: dict[str, Any]) -> AssignmentStore:
        """Open for writing (creating the store if needed) and set its metadata."""
        store = cls(path, readonly=False)
        store.set_meta(meta)
        return store

    def set_meta(self, meta: dict[str, Any]) -> None:
        """Store ``meta``; ``record_checksum`` is kept when set and added to a store
        without records (as in :meth:`lib.features.feature_store.FeatureStore.set_meta`)."""
        self._writable()
        meta = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
        checked = self.checksummed or len(self) == 0
        blob = json.dumps({**meta, **({CHECKSUM_KEY: CHECKSUM} if checked else {})},
                          sort_keys=True).encode("utf-8")
        write_growing(self.env, lambda txn: txn.put(META_KEY, blob), "assignment store")
        self.meta = meta
        self.checksummed = checked

    def _writable(self) -> None:
        if self.readonly:
            raise RuntimeError(f"{self.path}: opened read-only")

    def put_many(self, records: list[tuple[Any, ...]]) -> None:
        """Write (image id, words (H, W), (H0, W0)[, signature]) records in one
        transaction."""
        self._writable()
        values = [(r[0].encode("utf-8"), encode(*r[1:])) for r in records]
        if any(k == META_KEY for k, _ in values):
            raise UserError(f"image id '{META_KEY.decode()}' is reserved")

        def fill(txn: lmdb.Transaction) -> None:
            for k, v in values:
                txn.put(k, v)

        write_growing(self.env, fill, "assignment store")

    def _read(self, image_id: str, decoder: Callable[[memoryview, str, bool], Any]) -> Any:
        """One image's record through ``decoder``, inside the read transaction (the
        buffer is only valid there)."""
        with self.env.begin(buffers=True) as txn:
            buf = txn.get(image_id.encode("utf-8"))
            if buf is None or image_id.encode("utf-8") == META_KEY:
                raise UserError(f"image '{image_id}' is not in the assignment store "
                                f"{self.path} (rerun step C)")
            return decoder(buf, f"{self.path}: image '{image_id}'", self.checksummed)

    def get(self, image_id: str) -> tuple[np.ndarray, tuple[int, int]]:
        """(words (H, W), original size (H0, W0)) of one image."""
        return self._read(image_id, decode)

    def get_signature(self, image_id: str) -> Signature | None:
        """(words, signatures) of one image's ASMK record, None when it has none."""
        return self._read(image_id, decode_signature)

    def get_both(self, image_id: str
                 ) -> tuple[np.ndarray, tuple[int, int], Signature | None]:
        """:meth:`get` and :meth:`get_signature` of one image in one read."""
        return self._read(image_id, decode_both)

    def __contains__(self, image_id: object) -> bool:
        if not isinstance(image_id, str) or image_id.encode("utf-8") == META_KEY:
            return False
        with self.env.begin() as txn:
            return txn.get(image_id.encode("utf-8"), default=None) is not None

    def ids(self) -> list[str]:
        """Stored image ids in key (byte) order."""
        with self.env.begin() as txn:
            return [k.decode("utf-8") for k in txn.cursor().iternext(values=False)
                    if k != META_KEY]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def __len__(self) -> int:
        n = self.env.stat()["entries"]
        with self.env.begin() as txn:
            return n - (txn.get(META_KEY) is not None)

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> AssignmentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
