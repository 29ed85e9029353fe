"""The feature store of step A: one LMDB environment (a folder) of local CNN maps.

Why LMDB: one file set, memory-mapped zero-copy reads from many processes, and
transactions: step A commits one transaction per batch, so an interrupted run leaves
only whole batches and resumes exactly where it stopped.

Layout (all integers little-endian):

* **Name**: ``<path_features>/<network>-<weights>-<layers joined by +>-<H>x<W>-<resize>
  .lmdb`` (``H``×``W`` = ``input_size``, portrait order; ``max_side`` mode appends the
  side: ``-max_side1024``). Corrupt images: ``<name>.corrupted.txt`` beside it, one
  ``image_id<TAB>reason`` line each; an id that cannot be a key (a file name that is not
  UTF-8, written there with backslash ``xNN`` escapes, or more than 511 bytes) is listed there too.
* **Key**: the image id, UTF-8 (``Canon/001``).
* **Value**: a 16-byte header ``struct "<4sBBHII"``: magic ``b"LCF2"``, dtype code
  (1 = float16, 2 = float32), ``L`` = number of layers, 2 reserved bytes (0), the original
  image height ``H0`` and width ``W0`` (after EXIF orientation); then ``L`` shape records
  ``"<III"`` = (C, h, w), one per layer in the order of ``meta["provenance"]["layers"]``;
  then the ``L`` maps, each C-contiguous (C, h, w) in the header's dtype; then a 4-byte
  ``"<I"`` trailer, the CRC-32 (``zlib.crc32``) of every byte before it. Records written
  before the trailer existed (magic ``b"LCF1"``, the same layout without it) still
  decode, unverified.
* **Metadata**: the reserved key ``__meta__`` holds UTF-8 JSON: ``provenance``
  (:func:`lib.features.networks.feature_provenance`), ``layers``, ``feature_dtype``, ``count``,
  ``settings_hash`` (step A), ``versions``, ``created``, ``complete``; and, in a store
  whose records all carry the trailer, ``record_checksum`` = ``"crc32"``.

Why the checksum: LMDB checksums nothing, and a flipped bit in a map decodes as a valid
value. Every full decode verifies the trailer first (zero-copy, on the LMDB buffer), so a
damaged record stops the step with the store and the image id instead of silently moving
features; deleting that key and resuming step A re-creates only it. The store manages
``record_checksum`` itself (``set_meta``): it is set when a store is created
empty, kept while it is set, and never added to a store that holds old records (a resumed
old store gets new-format records but stays unmarked). Readers of a marked store refuse a
record with an old magic, since one flipped bit could otherwise turn a new magic into an
old one and skip the check.

Opening (here and in :mod:`lib.index.assignment_store`, through :func:`open_env`) first
compares ``data.mdb`` with the size its own meta page records: a truncated file is
refused with one line instead of a SIGBUS at the first read of a missing page. The map
reserves twice the file (at least 1 GiB here, 64 MiB for assignments) and doubles when a
write fills it, so the stores work under ``ulimit -v``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from lib.artefacts import write_text_atomic
from lib.errors import UserError, store_write_error

META_KEY = b"__meta__"
# identity ([size, mtime_ns]) of the image file behind every record, so that step A
# extracts again an image whose file changed (another folder, a rewritten photo)
INPUTS_KEY = b"__inputs__"
RESERVED = (META_KEY, INPUTS_KEY)
_INPUTS_MAGIC = b"INP1"
MAGIC = b"LCF2"  # records with the CRC-32 trailer
MAGIC_V1 = b"LCF1"  # older records: the same layout without the trailer
HEADER = struct.Struct("<4sBBHII")
TRAILER = struct.Struct("<I")  # CRC-32 of every byte before it
# the __meta__ key (and its only value) of a store whose records all carry a trailer
CHECKSUM_KEY = "record_checksum"
CHECKSUM = "crc32"
SHAPE = struct.Struct("<III")
DTYPES = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
DTYPE_CODES = {"float16": 1, "float32": 2}
_INITIAL_MAP = 1 << 30
# LMDB's own limit on a key (mdb_env_get_maxkeysize of the bundled build)
MAX_KEY_BYTES = 511
# LMDB meta page (64-bit little-endian build): a 16-byte page header, then MDB_meta:
# magic, version, address, mapsize, two MDB_db records (the first one's md_pad holds the
# page size), last used page number, txnid
_META_MAGIC = 0xBEEFC0DE
_META_HEAD = struct.Struct("<II8xQI")  # magic, version, mapsize, page size (at +16)
_META_TAIL = struct.Struct("<QQ")  # last_pgno, txnid (at +136)
_META_PAGE_BYTES = 152


def encode_record(maps: Mapping[str, np.ndarray] | Sequence[np.ndarray],
                  size_hw: Sequence[int], dtype: str = "float16") -> bytes:
    """Bytes of one value (see module doc); ``maps`` in layer order. The CRC-32 runs
    over the parts as they are joined (no second pass over a joined copy)."""
    arrays = list(maps.values()) if isinstance(maps, Mapping) else list(maps)
    code = DTYPE_CODES[dtype]
    dt = DTYPES[code]
    parts: list[Any] = [HEADER.pack(MAGIC, code, len(arrays), 0, int(size_hw[0]),
                                    int(size_hw[1]))]
    body = []
    for a in arrays:
        if a.ndim != 3:
            raise ValueError(f"maps must be (C, h, w), got shape {a.shape}")
        parts.append(SHAPE.pack(*a.shape))
        body.append(memoryview(np.ascontiguousarray(a, dtype=dt)).cast("B"))
    crc = 0
    for p in parts + body:
        crc = zlib.crc32(p, crc)
    return b"".join(parts + body + [TRAILER.pack(crc)])


def verify_crc(buf: bytes | memoryview, where: str, step: str) -> int:
    """Length of ``buf`` without its CRC-32 trailer, after checking the trailer
    (zero-copy: ``zlib.crc32`` reads the LMDB buffer in place). A mismatch is one line
    naming the record (``where``) and the step that re-creates it."""
    n = len(buf) - TRAILER.size
    if n < 0 or zlib.crc32(memoryview(buf)[:n]) != TRAILER.unpack_from(buf, n)[0]:
        raise UserError(f"{where} is corrupt (CRC-32 mismatch): delete that record (or the "
                        f"store) and rerun step {step}; the resume re-creates only missing "
                        "records")
    return n


def payload_size(buf: bytes | memoryview, magic: bytes, current: Collection[bytes],
                 old: Collection[bytes], where: str, step: str, require_checksum: bool
                 ) -> int:
    """The length of a record before its trailer, by its magic: a ``current`` magic's
    CRC-32 verified (:func:`verify_crc`), an ``old`` magic's whole length (refused with
    :func:`old_record` when ``require_checksum``), -1 for a magic of neither kind (the
    caller names the record kind). Both stores' decoders dispatch through it."""
    if magic in current:
        return verify_crc(buf, where, step)
    if magic in old:
        if require_checksum:
            raise old_record(where, magic, step)
        return len(buf)
    return -1


def old_record(where: str, magic: bytes, step: str) -> UserError:
    """The refusal of an old-magic record in a store whose records all carry a trailer."""
    return UserError(f"{where} is corrupt: magic {magic!r} has no CRC-32 trailer, but every "
                     f"record of this store has one: delete that record (or the store) and "
                     f"rerun step {step}; the resume re-creates only missing records")


def checksum_marked(stored: Mapping[str, Any], where: str) -> bool:
    """Whether a store's stored metadata says every record carries a CRC-32 trailer. An
    unknown checksum name is refused (a newer format this code cannot verify). Writers
    keep the mark once set and add it only to a store without records: see the stores'
    ``set_meta``."""
    found = stored.get(CHECKSUM_KEY)
    if found is not None and found != CHECKSUM:
        raise UserError(f"{where}: records carry a {found!r} checksum, which this version "
                        "cannot verify (update BLCF, or rebuild the store)")
    return found == CHECKSUM


def decode_record(buf: bytes | memoryview, where: str = "record",
                  require_checksum: bool = False
                  ) -> tuple[list[np.ndarray], tuple[int, int]]:
    """(maps as float32 (C, h, w) in layer order, (H0, W0)) of one value. An ``LCF2``
    record is verified against its CRC-32 before its shapes are read; ``LCF1`` decodes
    unverified unless ``require_checksum`` (a store marked ``record_checksum``) refuses it."""
    if len(buf) < HEADER.size:
        raise UserError(f"{where}: value too short for a feature record")
    magic, code, n, _, h0, w0 = HEADER.unpack_from(buf, 0)
    end = payload_size(buf, magic, (MAGIC,), (MAGIC_V1,), where, "A", require_checksum)
    if end < 0 or code not in DTYPES:
        raise UserError(f"{where}: not a feature record (magic {magic!r}, dtype {code})")
    dt = DTYPES[code]
    off = HEADER.size + SHAPE.size * n
    if off > end:
        raise UserError(f"{where}: value too short for a feature record")
    maps = []
    for i in range(n):
        c, h, w = SHAPE.unpack_from(buf, HEADER.size + SHAPE.size * i)
        count = c * h * w
        if off + count * dt.itemsize > end:
            raise UserError(f"{where}: feature record shorter than its shapes say")
        a = np.frombuffer(buf, dtype=dt, count=count, offset=off).reshape(c, h, w)
        maps.append(a.astype(np.float32))
        off += count * dt.itemsize
    if off != end:
        raise UserError(f"{where}: feature record has {end - off} trailing bytes")
    return maps, (int(h0), int(w0))


def record_size_hw(buf: bytes | memoryview) -> tuple[int, int]:
    """Only the original (H0, W0) of a value (cheap: header only, not verified, so that
    listing image sizes does not page in every map)."""
    _, _, _, _, h0, w0 = HEADER.unpack_from(buf, 0)
    return int(h0), int(w0)


class FeatureStore:
    """Read (default) or write access to one feature store.

    Safe across ``fork``: a process that inherits an open store reopens it on first use
    (LMDB environments must not be shared between processes)."""

    def __init__(self, path: str | os.PathLike, readonly: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly and not (self.path / "data.mdb").is_file():
            raise UserError(f"{self.path}: feature store not found (run step A first)")
        self._env: lmdb.Environment | None = None
        self._pid = -1
        self._meta: dict[str, Any] | None = None
        self._checked: bool | None = None  # every record carries a CRC-32 trailer
        self._layers: list[str] | None = None
        self._open()

    # ------------------------------------------------------------------ plumbing
    def _open(self) -> None:
        hint = "delete the folder and rerun step A"
        if not self.readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        self._env = open_env(self.path, "feature store", hint, readonly=self.readonly,
                             lock=not self.readonly, minimum=_INITIAL_MAP, max_readers=512)
        self._pid = os.getpid()

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            raise UserError(f"{self.path}: feature store is closed")
        if self._pid != os.getpid():
            self._open()
        return self._env

    @staticmethod
    def path_for(settings: Mapping[str, Any]) -> Path:
        """``<path_features>/<network>-<weights>-<layers+>-<H>x<W>-<resize>.lmdb``; with
        weights from a file (``file``, ``caffe``) the family is followed by the first 8 hex
        digits of the file's SHA-256, so new weights written over the same file (a
        fine-tuned checkpoint) get a store of their own instead of stale features."""
        from lib.features.networks import feature_provenance, resolve_family

        fam = resolve_family(settings["network"], settings["weights"])
        wf = settings.get("weights_file")
        if fam in ("caffe", "file") and wf is not None and Path(wf).is_file():
            fam += feature_provenance(settings)["weights_file_sha256"][:8]
        h, w = settings["input_size"]
        resize = settings["resize"]
        if resize == "max_side":
            resize = f"max_side{int(settings['max_side'])}"
        name = (f"{settings['network']}-{fam}-{'+'.join(settings['layers'])}-{h}x{w}-"
                f"{resize}.lmdb")
        return Path(settings["path_features"]) / name

    @classmethod
    def create(cls, path: str | os.PathLike, meta: Mapping[str, Any]) -> FeatureStore:
        """Open for writing (creating it when absent) and set its metadata record."""
        st = cls(path, readonly=False)
        st.set_meta(meta)
        return st

    def corrupted_path(self) -> Path:
        return corrupted_path(self.path)

    # ------------------------------------------------------------------ metadata
    @property
    def meta(self) -> dict[str, Any]:
        """The caller's metadata; ``record_checksum`` is the store's own (see
        :attr:`checksummed`), kept out of it so that comparisons of metadata (resume
        checks, caches) do not depend on the record format."""
        if self._meta is None:
            with self.env.begin() as txn:
                raw = txn.get(META_KEY)
            if raw is None:
                meta = {}
            else:
                try:
                    meta = json.loads(bytes(raw).decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise UserError(f"{self.path}: metadata record is not valid JSON "
                                    "(rerun step A into a new folder)") from None
            self._checked = checksum_marked(meta, str(self.path))
            meta.pop(CHECKSUM_KEY, None)
            self._meta = meta
        return dict(self._meta)

    @property
    def checksummed(self) -> bool:
        """Whether every record carries a CRC-32 trailer (``record_checksum`` in the
        stored metadata), so that a record with an old magic is refused."""
        if self._checked is None:
            _ = self.meta  # reads the flag with the metadata
        return bool(self._checked)

    def set_meta(self, meta: Mapping[str, Any]) -> None:
        """Store ``meta``; ``record_checksum`` is kept when set and added to a store
        without records (whose every record will carry a trailer), whatever ``meta``
        says."""
        meta = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
        checked = self.checksummed or len(self) == 0
        blob = json.dumps({**meta, **({CHECKSUM_KEY: CHECKSUM} if checked else {})},
                          sort_keys=True).encode("utf-8")
        self._write([(META_KEY, blob)])
        self._meta = meta
        self._checked = checked
        self._layers = None

    @property
    def layers(self) -> list[str]:
        """Layer names in record order (from the metadata)."""
        if self._layers is None:
            m = self.meta
            layers = m.get("layers") or (m.get("provenance") or {}).get("layers")
            if not layers:
                raise UserError(f"{self.path}: metadata field 'layers' missing")
            self._layers = list(layers)
        return list(self._layers)

    # ------------------------------------------------------------------ reading
    def ids(self) -> list[str]:
        """Every stored image id, sorted."""
        with self.env.begin() as txn:
            keys = [bytes(k).decode("utf-8") for k in txn.cursor().iternext(values=False)
                    if k not in RESERVED]
        keys.sort()
        return keys

    def sizes(self) -> dict[str, tuple[int, int]]:
        """{image id: (H0, W0)} of every stored image (one cursor pass, headers only)."""
        out = {}
        with self.env.begin(buffers=True) as txn:
            for k, v in txn.cursor():
                k = bytes(k)
                if k not in RESERVED:
                    out[k.decode("utf-8")] = record_size_hw(v)
        return out

    def __contains__(self, image_id: object) -> bool:
        if not isinstance(image_id, str):
            return False
        with self.env.begin(buffers=True) as txn:
            return txn.get(image_id.encode("utf-8")) is not None

    def __len__(self) -> int:
        n = self.env.stat()["entries"]
        with self.env.begin(buffers=True) as txn:
            return n - sum(txn.get(k) is not None for k in RESERVED)

    def get_raw(self, image_id: str) -> bytes:
        with self.env.begin() as txn:
            raw = txn.get(image_id.encode("utf-8"))
        if raw is None:
            raise UserError(f"{self.path}: image '{image_id}' not in the feature store")
        return raw

    def get(self, image_id: str) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
        """({layer: float32 (C, h, w)}, (H0, W0)) of one image."""
        checked = self.checksummed  # before the transaction (one per thread)
        with self.env.begin(buffers=True) as txn:
            raw = txn.get(image_id.encode("utf-8"))
            if raw is None:
                raise UserError(f"{self.path}: image '{image_id}' not in the feature store")
            maps, size = decode_record(raw, f"{self.path}: image '{image_id}'", checked)
        layers = self.layers
        if len(layers) != len(maps):
            raise UserError(f"{self.path}: image '{image_id}' has {len(maps)} layers, the "
                            f"metadata lists {len(layers)}")
        return dict(zip(layers, maps)), size

    # ------------------------------------------------------------------ writing
    def put_many(self, records: Iterable[tuple[str, Mapping[str, np.ndarray],
                                               Sequence[int]]]) -> None:
        """Write ``(image_id, {layer: map}, (H0, W0))`` records in ONE transaction,
        in the metadata's ``feature_dtype`` and layer order."""
        dtype = self.meta.get("feature_dtype", "float16")
        layers = self.layers
        items = []
        for image_id, maps, size in records:
            if image_id.encode("utf-8") in RESERVED:
                raise UserError(f"image id '{image_id}' is reserved")
            missing = [ly for ly in layers if ly not in maps]
            if missing:
                raise ValueError(f"record '{image_id}' lacks layer(s) {missing}")
            items.append((image_id.encode("utf-8"),
                          encode_record([maps[ly] for ly in layers], size, dtype)))
        self._write(items)

    def inputs(self) -> dict[int, tuple[int, int]] | None:
        """{id key: (size, mtime_ns)} of the image files behind the records (see
        :func:`input_key`; size -1 = the file was missing), or None for a store written
        before this record existed."""
        with self.env.begin() as txn:
            raw = txn.get(INPUTS_KEY)
        if raw is None:
            return None
        raw = bytes(raw)
        if raw[:4] != _INPUTS_MAGIC or (len(raw) - 12) % 24:
            raise UserError(f"{self.path}: the record {INPUTS_KEY.decode()} is damaged "
                            "(delete the store and rerun step A)")
        n = int(np.frombuffer(raw, "<u8", 1, 4)[0])
        a = np.frombuffer(raw, "<i8", 3 * n, 12).reshape(3, n)
        return dict(zip(a[0].view("<u8").tolist(), zip(a[1].tolist(), a[2].tolist())))

    def replace_inputs(self, inputs: Mapping[int, tuple[int, int]],
                       drop: Sequence[str] = ()) -> None:
        """In one transaction: drop the records of ``drop`` (their files changed) and
        store ``inputs`` (sorted by key, so equal inputs give equal bytes)."""
        keys = np.array(sorted(inputs), dtype="<u8")
        vals = np.array([inputs[k] for k in keys.tolist()], dtype="<i8").reshape(-1, 2)
        blob = (_INPUTS_MAGIC + np.array([len(keys)], "<u8").tobytes() + keys.tobytes()
                + np.ascontiguousarray(vals[:, 0]).tobytes()
                + np.ascontiguousarray(vals[:, 1]).tobytes())
        self._write([(INPUTS_KEY, blob)], delete=[i.encode("utf-8") for i in drop])

    def _write(self, items: list[tuple[bytes, bytes]], delete: Sequence[bytes] = ()) -> None:
        if self.readonly:
            raise UserError(f"{self.path}: opened read-only")

        def fill(txn: lmdb.Transaction) -> None:
            for k in delete:
                txn.delete(k)
            for k, v in items:
                txn.put(k, v)

        write_growing(self.env, fill, "feature store")

    def sync(self) -> None:
        if not self.readonly:
            self.env.sync(True)

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            self._env.close()
        self._env = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def input_key(image_id: str) -> int:
    """64-bit key of an image id in the inputs record (8 bytes instead of the id)."""
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(),
                          "little")


def _data_size(path: Path) -> int:
    f = path / "data.mdb"
    return f.stat().st_size if f.is_file() else 0


def map_size_for(path: str | os.PathLike, minimum: int = 64 << 20) -> int:
    """Address space to reserve for an environment: twice its file, at least
    ``minimum``; :func:`write_growing` doubles it when a write needs more. (A fixed
    reservation of a terabyte fails under ``ulimit -v``.)"""
    return max(int(minimum), _data_size(Path(path)) * 2)


def check_data_file(path: str | os.PathLike, what: str, hint: str) -> None:
    """Refuse (one line) an environment whose ``data.mdb`` is shorter than its own meta
    page says: mapping it works, but the first read of a missing page kills the process
    with SIGBUS (a truncated copy, a full disk). Read with plain file reads, before
    ``lmdb.open``. The meta page with the higher txnid is the current one (as LMDB
    itself chooses); a file that is absent or empty is left to LMDB (a new store)."""
    f = Path(path) / "data.mdb"
    try:
        size = f.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    bad = (f"{path}: the {what} is damaged: its file data.mdb is shorter than its own "
           f"record says ({{}}); {hint}")
    with open(f, "rb") as fh:
        head = fh.read(_META_PAGE_BYTES)
        if len(head) < _META_PAGE_BYTES:
            raise UserError(bad.format(f"{size} bytes, not even one meta page"))
        magic, _, _, psize = _META_HEAD.unpack_from(head, 16)
        if magic != _META_MAGIC or psize < 512 or psize & (psize - 1):
            return  # not the layout this check knows: LMDB reports what it finds
        fh.seek(psize)
        second = fh.read(_META_PAGE_BYTES)
    if len(second) < _META_PAGE_BYTES:
        raise UserError(bad.format(f"{size} bytes, less than the two meta pages"))
    metas = [_META_TAIL.unpack_from(head, 136)]
    if _META_HEAD.unpack_from(second, 16)[0] == _META_MAGIC:
        metas.append(_META_TAIL.unpack_from(second, 136))
    last_pgno, _ = max(metas, key=lambda m: m[1])
    need = (last_pgno + 1) * psize
    if size < need:
        raise UserError(bad.format(f"{size} bytes, at least {need} expected"))


def open_env(path: str | os.PathLike, what: str, hint: str, readonly: bool, lock: bool,
             minimum: int = 64 << 20, **kwargs: Any) -> lmdb.Environment:
    """``lmdb.open`` of a store folder after :func:`check_data_file`, with the map
    sized by :func:`map_size_for`; an LMDB error becomes one line naming the store."""
    check_data_file(path, what, hint)
    try:
        # read-only: the file is all there is to map (LMDB raises it to the used size)
        size = max(_data_size(Path(path)), 1 << 20) if readonly else map_size_for(path, minimum)
        return lmdb.open(str(path), map_size=size, readonly=readonly,
                         lock=lock, subdir=True, readahead=False, **kwargs)
    except lmdb.Error as e:
        raise UserError(f"{path}: cannot open the {what} ({e}); {hint}") from None


def write_growing(env: lmdb.Environment, fill: Any, what: str = "store") -> None:
    """``fill(txn)`` in one write transaction; when the map is full, the transaction is
    aborted, the map doubled and ``fill`` run again. Any other LMDB failure (a full disk
    surfaces as an I/O error at commit) aborts the transaction, so the store keeps its
    earlier batches, and becomes one line naming the store."""
    while True:
        try:
            with env.begin(write=True) as txn:
                fill(txn)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)
        except lmdb.Error as e:
            raise store_write_error(env.path(), what, e) from None


def key_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot be a store key (None when it can): not encodable as
    UTF-8 (a file name in another encoding) or longer than LMDB's key limit."""
    try:
        n = len(image_id.encode("utf-8"))
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (rename the file)"
    if n > MAX_KEY_BYTES:
        return (f"image id is {n} bytes long in UTF-8, the store allows at most "
                f"{MAX_KEY_BYTES} (shorten the file name or folder)")
    if n == 0:
        return "empty image id"
    return None


def printable_id(image_id: str) -> str:
    """``image_id`` as UTF-8-safe text (undecodable bytes written as ``\\xNN``)."""
    try:
        image_id.encode("utf-8")
        return image_id
    except UnicodeEncodeError:
        pass
    try:  # a name read from disk: undecodable bytes were kept as surrogate escapes
        raw = image_id.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return image_id.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def corrupted_path(store_path: str | os.PathLike) -> Path:
    """``<store path without .lmdb>.corrupted.txt``."""
    p = Path(store_path)
    stem = p.name[:-5] if p.name.endswith(".lmdb") else p.name
    return p.with_name(stem + ".corrupted.txt")


def write_corrupted(store_path: str | os.PathLike, entries: Iterable[tuple[str, str]]) -> Path:
    """Atomically (re)write the corrupt-image list: ``image_id<TAB>reason``, sorted."""
    lines = sorted(f"{printable_id(i)}\t{' '.join(str(r).split())}" for i, r in entries)
    path = corrupted_path(store_path)
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return path


def read_corrupted(store_path: str | os.PathLike) -> dict[str, str]:
    path = corrupted_path(store_path)
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            i, _, r = line.partition("\t")
            out[i] = r
    return out
