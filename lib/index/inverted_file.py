"""The memory-mapped inverted file: partitioned build, streaming merge, cosine scoring.

Why this shape: the original (``invidx``) stored 8 bytes per posting in one packed file
and scored through a ``std::map``; at 1M images that is ~8 GB to build in memory. Here
the build runs partition by partition (bounded memory), the merge streams word blocks
from the partitions straight to disk, a posting costs 6 bytes, and a query touches only
the postings of its own words (scipy's compiled sparse kernels copy the query's posting
runs and multiply them by the query weights), so a query's cost is proportional to the
postings it touches (figures: benchmarks/README.md).

Format (a folder, written atomically; format version 1)::

    meta.json      {"format": "blcf-inverted-file", "format_version": 1, "n_docs",
                    "n_words", "n_postings", "weight_encoding": "uint16-fixed-point",
                    "weight_scale": 65535, "idf": bool, "meta": {caller's metadata}}
    image_ids.txt  one image id per line; line i = doc id i = database order
    offsets.npy    int64 (n_words + 1,); postings of word w are [offsets[w], offsets[w+1])
    docs.npy       uint32 (n_postings,), word-major, ascending doc ids within a word
    weights.npy    uint16 (n_postings,): round(weight * 65535), weight in [0, 1]
    idf.npy        float32 (n_words,), only when idf is on: log(N / df), 0 for unused words

Weights are the entries of each image's L2-normalised BoW vector (with idf: the vector
multiplied by idf and re-normalised). Since every entry lies in [0, 1], a uint16 fixed
point with step 1/65535 loses at most 0.5/65535 = 7.6e-6 per entry; for a unit-norm query
with n words the score error is at most 7.6e-6 * sqrt(n) (Cauchy-Schwarz), i.e. 2.4e-4
for 1,000 query words and typically ~100x less (errors are independent and centred).
float16 would have the same 6 bytes but a relative error of 2^-11, i.e. up to 2.4e-4 per
entry near 1. All ``.npy`` files are memory-mapped on load (``allow_pickle=False``).

Partitions (temporary, inside the folder being written): ``part.json`` (doc_offset,
n_docs, n_postings, n_words), ``offsets.npy`` int64, ``docs.npy`` uint32 (global doc ids),
``vals.npy`` float32 (unquantised weights). The merge quantises (and applies idf, which
needs the global document frequencies, hence after all partitions exist).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lib.artefacts import atomic_path, check_fields, load_npy, read_json
from lib.errors import UserError
from lib.search.rankings import rank_scores  # the tie rule lives with the ranking folders

log = logging.getLogger(__name__)

FORMAT = "blcf-inverted-file"
FORMAT_VERSION = 1
PART_FORMAT = "blcf-inverted-file-partition"
# kernel = asmk: postings of the aggregated images (one per image and distinct word)
ASMK_OFFSETS = "asmk_offsets.npy"  # int64 (n_words + 1,)
ASMK_DOCS = "asmk_docs.npy"  # uint32 (n_asmk_postings,), ascending within a word
ASMK_SIGNATURES = "asmk_signatures.npy"  # uint8 (n_asmk_postings, bytes)
ASMK_WEIGHTS = "asmk_weights.npy"  # float32 (n_asmk_postings,): the word's weight in the image
WEIGHT_SCALE = 65535  # uint16 fixed point: stored = round(weight * WEIGHT_SCALE)
# Postings held in memory before a partition is flushed (~12 bytes each while building,
# ~3x that during the sort): 2**25 postings is ~1.2 GB peak, ~30k images of 1,000 words.
DEFAULT_PARTITION_POSTINGS = 1 << 25
# Postings per merge block (read from all partitions, written out in one go).
MERGE_BLOCK_POSTINGS = 1 << 24
# Postings gathered at once while scoring. Small enough that a block's copies (~10 bytes
# a posting) stay in the CPU caches, large enough that the per-block overhead vanishes;
# benchmarks/bench_scoring.py times the block sizes (figures: benchmarks/README.md).
SCORE_BLOCK = 1 << 19
# top_k: rows of the score matrix whose column maxima bound the k-th score (see top_k).
TOP_K_ROWS = 32
# Largest index whose posting runs scipy's compiled kernels copy and multiply directly
# (int32 offsets); larger ones slice the runs word by word (InvertedFile._run_kernels).
KERNEL_MAX_POSTINGS = 2**31 - 1

SparseVec = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- npy streaming

def _npy_header(dtype: np.dtype, n: int) -> bytes:
    """The exact header ``np.save`` writes for a 1-D C-contiguous array (version 1.0)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
              "fortran_order": False, "shape": (int(n),)})
    return buf.getvalue()


class _NpyWriter:
    """Append-only writer of a 1-D ``.npy`` whose length is known up front.

    Why not a memmap: pages of a written memmap count in the process's RSS, which would
    make the merge's peak memory grow with the index size."""

    def __init__(self, path: Path, dtype: Any, n: int) -> None:
        self.path, self.dtype, self.n, self.written = path, np.dtype(dtype), int(n), 0
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(_npy_header(self.dtype, n))

    def write(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        self.f.write(a.tobytes())
        self.written += a.size

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        if self.written != self.n:
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.n} entries")


class _NpyReader:
    """Random-access reads of slices of a 1-D ``.npy`` with plain file reads (no mmap,
    so the pages do not count in the merge's RSS)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        m = load_npy(path, mmap=True)  # validates header and length; pages never touched
        if m.ndim != 1 or not m.flags.c_contiguous:
            raise UserError(f"{path}: expected a 1-D array, found shape {m.shape}")
        self.start, self.dtype, self.n = int(m.offset), m.dtype, m.shape[0]
        del m
        self.f = open(path, "rb")  # noqa: SIM115 - closed in close()

    def read(self, lo: int, hi: int) -> np.ndarray:
        self.f.seek(self.start + lo * self.dtype.itemsize)
        out = np.fromfile(self.f, dtype=self.dtype, count=hi - lo)
        if out.size != hi - lo:
            raise UserError(f"{self.path}: truncated (wanted entries {lo}..{hi})")
        return out

    def close(self) -> None:
        self.f.close()


# --------------------------------------------------------------------------- partitions

def _check_vector(v: SparseVec, n_words: int, doc: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.asarray(v[0])
    val = np.asarray(v[1], dtype=np.float32)
    if idx.ndim != 1 or idx.shape != val.shape:
        raise ValueError(f"doc {doc}: idx and val must be 1-D of the same length")
    if idx.size:
        if idx[0] < 0 or idx[-1] >= n_words:
            raise ValueError(f"doc {doc}: word ids must lie in [0, {n_words})")
        if idx.size > 1 and not np.all(idx[1:] > idx[:-1]):
            raise ValueError(f"doc {doc}: word ids must be sorted and unique")
        if val.min() < 0 or val.max() > 1.0 + 1e-5:
            raise ValueError(f"doc {doc}: weights must lie in [0, 1] (L2-normalised, >= 0)")
    return idx, val


def _write_partition(out_dir: Path, idx_list: list[np.ndarray], val_list: list[np.ndarray],
                     n_words: int, doc_offset: int) -> Path:
    """Word-major counting sort of one chunk of images, written as a partition folder."""
    n_docs = len(idx_list)
    lens = np.fromiter((a.size for a in idx_list), np.int64, n_docs)
    n_post = int(lens.sum())
    words = np.concatenate(idx_list) if n_post else np.zeros(0, np.int32)
    vals = np.concatenate(val_list).astype(np.float32) if n_post else np.zeros(0, np.float32)
    docs = np.repeat(np.arange(doc_offset, doc_offset + n_docs, dtype=np.uint32), lens)
    # Stable sort by word keeps doc ids ascending within a word; uint16 keys get numpy's
    # O(n) radix sort (K = 25k fits), larger vocabularies a merge sort.
    key = words.astype(np.uint16 if n_words <= 1 << 16 else np.int64)
    order = np.argsort(key, kind="stable")
    del key
    counts = np.bincount(words, minlength=n_words)
    del words
    offsets = np.zeros(n_words + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "offsets.npy", offsets, allow_pickle=False)
    np.save(out_dir / "docs.npy", docs[order], allow_pickle=False)
    del docs
    np.save(out_dir / "vals.npy", vals[order], allow_pickle=False)
    info = {"format": PART_FORMAT, "format_version": FORMAT_VERSION, "n_words": n_words,
            "doc_offset": doc_offset, "n_docs": n_docs, "n_postings": n_post}
    (out_dir / "part.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out_dir


def _chunks(vectors: Iterable[SparseVec], n_words: int, doc_offset: int,
            max_postings: int) -> Iterator[tuple[list[np.ndarray], list[np.ndarray], int]]:
    """Group the stream of vectors into chunks of at most ``max_postings`` postings."""
    idx_l: list[np.ndarray] = []
    val_l: list[np.ndarray] = []
    n_post, start, doc = 0, doc_offset, doc_offset
    for v in vectors:
        idx, val = _check_vector(v, n_words, doc)
        if idx_l and n_post + idx.size > max_postings:
            yield idx_l, val_l, start
            idx_l, val_l, n_post, start = [], [], 0, doc
        idx_l.append(idx.astype(np.int32, copy=False))
        val_l.append(val)
        n_post += idx.size
        doc += 1
    if idx_l or start == doc_offset:
        yield idx_l, val_l, start


def build_partition(out_dir: Path, vectors: Iterable[SparseVec], n_words: int,
                    doc_offset: int) -> Path:
    """Write the vectors (doc ids ``doc_offset, doc_offset+1, ...``) as one partition.

    For callers that build chunks in separate processes or runs (e.g. the 100k
    distractors) and merge them later with :func:`merge_partitions`."""
    out_dir = Path(out_dir)
    idx_l, val_l = [], []
    for i, v in enumerate(vectors):
        idx, val = _check_vector(v, n_words, doc_offset + i)
        idx_l.append(idx.astype(np.int32, copy=False))
        val_l.append(val)
    with atomic_path(out_dir) as tmp:
        _write_partition(tmp, idx_l, val_l, n_words, doc_offset)
    return out_dir


def _open_partitions(parts: Sequence[Path]) -> tuple[list[dict], list[np.ndarray]]:
    infos, offs = [], []
    expect_doc = 0
    for p in parts:
        p = Path(p)
        info = read_json(p / "part.json", "inverted-file partition record")
        if info.get("format") != PART_FORMAT:
            raise UserError(f"{p / 'part.json'}: not an inverted-file partition")
        if info.get("doc_offset") != expect_doc:
            raise UserError(f"{p}: partition starts at doc {info.get('doc_offset')}, expected "
                            f"{expect_doc} (partitions must be contiguous and in order)")
        if infos and info["n_words"] != infos[0]["n_words"]:
            raise UserError(f"{p}: n_words {info['n_words']} differs from the first "
                            f"partition's {infos[0]['n_words']}")
        off = load_npy(p / "offsets.npy")
        if off.shape != (info["n_words"] + 1,) or off[-1] != info["n_postings"]:
            raise UserError(f"{p / 'offsets.npy'}: does not match part.json")
        expect_doc += info["n_docs"]
        infos.append(info)
        offs.append(off.astype(np.int64))
    return infos, offs


def _word_blocks(offsets: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split words into consecutive blocks of about ``budget`` postings (at least 1 word)."""
    n_words = offsets.size - 1
    blocks, w = [], 0
    while w < n_words:
        hi = int(np.searchsorted(offsets, offsets[w] + budget, side="right")) - 1
        hi = min(max(hi, w + 1), n_words)
        blocks.append((w, hi))
        w = hi
    return blocks


def _merge_into(tmp: Path, parts: Sequence[Path], image_ids: Sequence[str], meta: dict,
                idf: bool, block_postings: int) -> None:
    infos, offs = _open_partitions(parts)
    if not infos:
        raise ValueError("merge_partitions needs at least one partition")
    n_words = infos[0]["n_words"]
    n_docs = sum(i["n_docs"] for i in infos)
    if len(image_ids) != n_docs:
        raise ValueError(f"{len(image_ids)} image ids for {n_docs} documents")
    counts = np.stack([np.diff(o) for o in offs])  # (P, K)
    df = counts.sum(axis=0)
    out_off = np.zeros(n_words + 1, np.int64)
    np.cumsum(df, out=out_off[1:])
    n_post = int(out_off[-1])
    # Start of partition p's postings of word w inside the output's posting list of w.
    before = np.cumsum(counts, axis=0) - counts  # (P, K)
    idf_vec = None
    if idf:
        with np.errstate(divide="ignore"):
            idf_vec = np.where(df > 0, np.log(n_docs / np.maximum(df, 1)), 0.0)
    docs_r = [_NpyReader(Path(p) / "docs.npy") for p in parts]
    vals_r = [_NpyReader(Path(p) / "vals.npy") for p in parts]
    blocks = _word_blocks(out_off, block_postings)

    def gather(w0: int, w1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Postings of words [w0, w1) from every partition, in output order."""
        lo, hi = out_off[w0], out_off[w1]
        d_out = np.empty(hi - lo, np.uint32)
        v_out = np.empty(hi - lo, np.float32)
        for p in range(len(parts)):
            a, b = offs[p][w0], offs[p][w1]
            if a == b:
                continue
            c = counts[p, w0:w1]
            # dest = output start of the word + earlier partitions' share + rank in slice
            base = out_off[w0:w1] - lo + before[p, w0:w1] - (offs[p][w0:w1] - a)
            dest = np.repeat(base, c) + np.arange(b - a)
            d_out[dest] = docs_r[p].read(a, b)
            v_out[dest] = vals_r[p].read(a, b)
        return d_out, v_out, np.repeat(np.arange(w0, w1), df[w0:w1])

    try:
        norm = None
        if idf_vec is not None:  # pass 1: norms of the idf-weighted rows
            sq = np.zeros(n_docs, np.float64)
            for w0, w1 in tqdm(blocks, desc="idf norms", unit="block", leave=False,
                               disable=len(blocks) < 4):
                d, v, w = gather(w0, w1)
                sq += np.bincount(d, (v.astype(np.float64) * idf_vec[w]) ** 2,
                                  minlength=n_docs)
            with np.errstate(divide="ignore"):
                norm = np.where(sq > 0, 1.0 / np.sqrt(sq), 0.0)
        dw = _NpyWriter(tmp / "docs.npy", np.uint32, n_post)
        ww = _NpyWriter(tmp / "weights.npy", np.uint16, n_post)
        for w0, w1 in tqdm(blocks, desc="merge", unit="block", leave=False,
                           disable=len(blocks) < 4):
            d, v, w = gather(w0, w1)
            x = v.astype(np.float64)
            if norm is not None:
                x *= idf_vec[w] * norm[d]
            dw.write(d)
            ww.write(quantise(x))
        dw.close()
        ww.close()
    finally:
        for r in docs_r + vals_r:
            r.close()
    np.save(tmp / "offsets.npy", out_off, allow_pickle=False)
    if idf_vec is not None:
        np.save(tmp / "idf.npy", idf_vec.astype(np.float32), allow_pickle=False)
    ids = list(image_ids)
    bad = next((i for i in ids if "\n" in i or "\r" in i), None)
    if bad is not None:
        raise UserError(f"image id {bad!r}: contains a line break")
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise UserError(f"image id {dup!r}: appears more than once in the database")
    (tmp / "image_ids.txt").write_text("".join(i + "\n" for i in ids), encoding="utf-8")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "n_docs": n_docs,
              "n_words": n_words, "n_postings": n_post,
              "weight_encoding": "uint16-fixed-point", "weight_scale": WEIGHT_SCALE,
              "idf": bool(idf), "meta": meta}
    (tmp / "meta.json").write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")


def quantise(x: np.ndarray) -> np.ndarray:
    """Weights in [0, 1] -> uint16 fixed point (round to nearest, clipped)."""
    return np.clip(np.rint(np.asarray(x, np.float64) * WEIGHT_SCALE), 0, WEIGHT_SCALE
                   ).astype(np.uint16)


def merge_partitions(parts: Sequence[Path], out_dir: Path, image_ids: Sequence[str],
                     meta: dict, idf: bool = False,
                     block_postings: int = MERGE_BLOCK_POSTINGS,
                     finish: Callable[[Path], None] | None = None) -> InvertedFile:
    """Merge contiguous partitions (in doc order) into the final inverted file.

    Streams word blocks of ~``block_postings`` postings, so peak memory is one block
    plus O(n_docs + n_partitions * n_words), whatever the index size. ``finish`` as in
    :meth:`InvertedFile.build` (the ASMK signatures)."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        _merge_into(tmp, parts, image_ids, meta, idf, block_postings)
        if finish is not None:
            finish(tmp)
    return InvertedFile.load(out_dir)


# --------------------------------------------------------------------------- the index

class InvertedFile:
    """A loaded (memory-mapped) inverted file. Build with :meth:`build`."""

    def __init__(self, path: Path, header: dict, image_ids: list[str], offsets: np.ndarray,
                 docs: np.ndarray, weights: np.ndarray, idf: np.ndarray | None) -> None:
        self.path = path
        self.header = header
        self.meta: dict = header.get("meta", {})
        self.image_ids = image_ids
        self.n_docs: int = header["n_docs"]
        self.n_words: int = header["n_words"]
        self.n_postings: int = header["n_postings"]
        self.offsets, self.docs, self.weights, self.idf = offsets, docs, weights, idf
        # plain ndarray views of the same mapping: slicing a np.memmap runs its
        # __array_finalize__ each time, an ndarray slice does not, and the fallback
        # scoring path slices once per query word
        self._docs, self._weights = np.asarray(docs), np.asarray(weights)
        self._df = np.diff(offsets)
        self._kernels: Any = False  # _run_kernels(): not looked up yet
        # kernel = asmk: its own postings, a signature each, and 1/sqrt(n_d) per image
        self.asmk_offsets: np.ndarray | None = None
        self.asmk_docs: np.ndarray | None = None
        self.asmk_signatures: np.ndarray | None = None
        self.asmk_weights: np.ndarray | None = None

    # ---- building
    @classmethod
    def build(cls, out_dir: Path, vectors: Iterable[SparseVec], n_words: int,
              image_ids: Sequence[str], meta: dict, idf: bool = False,
              partition_postings: int = DEFAULT_PARTITION_POSTINGS,
              block_postings: int = MERGE_BLOCK_POSTINGS,
              finish: Callable[[Path], None] | None = None) -> InvertedFile:
        """Build from one L2-normalised sparse vector per image, in database order.

        Consumes ``vectors`` lazily: chunks of ``partition_postings`` postings become
        partitions inside the folder being written, then one streaming merge.
        ``finish(folder)`` adds files to the folder before it is renamed into place (the
        ASMK signatures), so the index appears whole or not at all."""
        out_dir = Path(out_dir)
        with atomic_path(out_dir) as tmp:
            tmp.mkdir(parents=True)
            parts = []
            bar = tqdm(desc="inverted file", unit="img", total=len(image_ids),
                       leave=False, disable=len(image_ids) < 10000)
            for i, (idx_l, val_l, start) in enumerate(
                    _chunks(vectors, n_words, 0, partition_postings)):
                parts.append(_write_partition(tmp / "parts" / f"{i:05d}", idx_l, val_l,
                                              n_words, start))
                bar.update(len(idx_l))
            bar.close()
            log.debug("built %d partitions", len(parts))
            _merge_into(tmp, parts, image_ids, meta, idf, block_postings)
            shutil.rmtree(tmp / "parts")
            if finish is not None:
                finish(tmp)
        return cls.load(out_dir)

    # ---- loading
    @classmethod
    def load(cls, path: Path) -> InvertedFile:
        """Open an inverted file; every array is memory-mapped. Damage -> UserError."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path}: inverted file not found (run step C)")
        h = read_json(path / "meta.json", "inverted-file metadata")
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            raise UserError(f"{path / 'meta.json'}: not a BLCF inverted file")
        if h.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path / 'meta.json'}: format_version {h.get('format_version')}"
                            f" is not {FORMAT_VERSION}; rebuild with step C")
        try:
            n_docs, n_words, n_post = int(h["n_docs"]), int(h["n_words"]), int(h["n_postings"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path / 'meta.json'}: missing or bad field {e}") from None
        ids_path = path / "image_ids.txt"
        if not ids_path.exists():
            raise UserError(f"{ids_path}: file not found")
        ids = ids_path.read_text(encoding="utf-8").split("\n")
        if ids and ids[-1] == "":
            ids.pop()
        if len(ids) != n_docs:
            raise UserError(f"{ids_path}: {len(ids)} ids but meta.json says n_docs={n_docs}")

        def arr(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
            a = load_npy(path / name, mmap=True)
            if a.dtype != np.dtype(dtype) or a.shape != shape:
                raise UserError(f"{path / name}: expected {np.dtype(dtype)} {shape}, found "
                                f"{a.dtype} {a.shape}")
            return a

        offsets = np.array(arr("offsets.npy", np.int64, (n_words + 1,)))
        if offsets[0] != 0 or offsets[-1] != n_post or np.any(np.diff(offsets) < 0):
            raise UserError(f"{path / 'offsets.npy'}: not a valid offsets array")
        docs = arr("docs.npy", np.uint32, (n_post,))
        weights = arr("weights.npy", np.uint16, (n_post,))
        idf = np.array(arr("idf.npy", np.float32, (n_words,))) if h.get("idf") else None
        inv = cls(path, h, ids, offsets, docs, weights, idf)
        if (path / ASMK_SIGNATURES).exists():
            a_off = np.array(arr(ASMK_OFFSETS, np.int64, (n_words + 1,)))
            n_a = int(a_off[-1])
            if a_off[0] != 0 or np.any(np.diff(a_off) < 0):
                raise UserError(f"{path / ASMK_OFFSETS}: not a valid offsets array")
            sigs = load_npy(path / ASMK_SIGNATURES, mmap=True)
            if sigs.dtype != np.uint8 or sigs.ndim != 2 or sigs.shape[0] != n_a:
                raise UserError(f"{path / ASMK_SIGNATURES}: expected uint8 ({n_a}, n), "
                                f"found {sigs.dtype} {sigs.shape}")
            inv.asmk_offsets = a_off
            inv.asmk_docs = np.asarray(arr(ASMK_DOCS, np.uint32, (n_a,)))
            inv.asmk_signatures = sigs
            inv.asmk_weights = np.asarray(arr(ASMK_WEIGHTS, np.float32, (n_a,)))
        return inv

    def check_meta(self, expected: Mapping[str, Any], fields: Iterable[str],
                   hint: str = "rerun step C") -> None:
        """Refuse (ArtefactMismatchError naming the field and this meta.json) when the
        caller's metadata differs from what the settings ask for now."""
        check_fields(expected, self.meta, fields, str(self.path / "meta.json"), hint)

    # ---- querying
    @property
    def df(self) -> np.ndarray:
        """Document frequency of every word (int64, n_words)."""
        return self._df

    def query_weights(self, q: SparseVec) -> SparseVec:
        """The query as it is scored: idf-weighted and re-normalised when idf is on."""
        idx = np.asarray(q[0])
        val = np.asarray(q[1], np.float32)
        if idx.shape != val.shape or idx.ndim != 1:
            raise ValueError("query idx and val must be 1-D of the same length")
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_words):
            raise ValueError(f"query word ids must lie in [0, {self.n_words})")
        idx = idx.astype(np.int64)
        if self.idf is not None and idx.size:
            v = val.astype(np.float64) * self.idf[idx]
            n = np.sqrt(np.dot(v, v))
            val = (v / n if n > 0 else v).astype(np.float32)
        return idx, val

    def scores(self, q: SparseVec) -> np.ndarray:
        """Cosine score of every image (float32, n_docs), touching only the query's
        postings: per block of ~SCORE_BLOCK postings, the posting runs of the block's
        words become a (n_docs x block words) CSC matrix multiplied by the query weights
        in scipy's compiled loop (no Python per posting or per word, unlike the
        ``np.add.at`` gather it replaced; benchmarks/README.md). Each image's score is
        accumulated in float32 in query-word order; with scipy's kernels across blocks
        too, while the public-API fallback sums each block before adding it (a
        difference of ~1e-7 when a query spans several blocks)."""
        idx, val = self.query_weights(q)
        out = np.zeros(self.n_docs, np.float32)
        if idx.size == 0:
            return out
        if np.any(idx[1:] <= idx[:-1]):  # tolerate unsorted/duplicate query words
            uniq, inv = np.unique(idx, return_inverse=True)
            v = np.zeros(uniq.size, np.float64)
            np.add.at(v, inv, val)
            idx, val = uniq, v.astype(np.float32)
        starts = self.offsets[idx]
        ends = self.offsets[idx + 1]
        scale = (val * np.float32(1.0 / WEIGHT_SCALE)).astype(np.float32)
        cum = np.cumsum(ends - starts)
        total = int(cum[-1])
        if total <= SCORE_BLOCK:
            self._add_block(idx, starts, ends, scale, out)
            return out
        # groups of query words of ~SCORE_BLOCK postings: cache-sized copies
        cuts = np.searchsorted(cum, np.arange(SCORE_BLOCK, total, SCORE_BLOCK))
        bounds = [0, *np.unique(np.minimum(cuts + 1, idx.size)).tolist(), idx.size]
        for a, b in itertools.pairwise(bounds):
            if a < b:
                self._add_block(idx[a:b], starts[a:b], ends[a:b], scale[a:b], out)
        return out

    def _add_block(self, idx: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   scale: np.ndarray, out: np.ndarray) -> None:
        """``out += B @ scale`` where B (n_docs x len(idx), CSC) holds the posting runs of
        words ``idx`` (sorted, unique): doc ids as row indices, stored weights as
        values."""
        from scipy import sparse

        lens = ends - starts
        # block column pointers; int32 (scipy's index type) unless the block is larger,
        # which the kernels never see (they serve indexes of < 2**31 postings only)
        indptr = np.zeros(idx.size + 1, np.int64 if lens.sum() >= 2**31 else np.int32)
        np.cumsum(lens, out=indptr[1:])
        kernels = self._run_kernels()
        if kernels is not None:
            row_index, matvec, off32, docs32 = kernels
            rows = np.empty(int(indptr[-1]), np.int32)
            w = np.empty(rows.size, np.uint16)
            try:  # one compiled copy of the runs, one compiled product added into out
                row_index(idx.size, idx.astype(np.int32), off32, docs32, self._weights, rows, w)
                matvec(self.n_docs, idx.size, indptr, rows, w.astype(np.float32), scale, out)
                return
            except (TypeError, ValueError) as e:  # a scipy whose private kernels changed
                log.warning("scipy's sparse kernels refused the call (%s); scoring through "
                            "the public scipy.sparse API from now on (slower)", e)
                self._kernels = None
        docs32 = self._docs.view(np.int32)  # doc ids < 2**31: same bytes, scipy's type
        lo, hi = starts.tolist(), ends.tolist()
        # contiguous runs copied with memcpy speed; the comprehension costs Python per word
        docs = np.concatenate([docs32[i:j] for i, j in zip(lo, hi)])
        w = np.concatenate([self._weights[i:j] for i, j in zip(lo, hi)])
        out += sparse.csc_matrix((w, docs, indptr), shape=(self.n_docs, idx.size)) @ scale

    def _run_kernels(self) -> Any:
        """scipy's compiled kernels that copy rows of a CSR matrix and multiply a CSC
        matrix by a vector (``scipy.sparse._sparsetools``: a private module, so every
        use has the public API as fallback), with the offsets and doc ids as int32 (the
        kernels' index type); None past int32 offsets or without the kernels.

        Why: the index's arrays are already a CSR matrix of words (offsets, docs,
        weights), so the kernels copy a query's posting runs in one call instead of
        slicing them word by word (Python objects per word) and skip the public API's
        per-call checks (the two paths are timed by benchmarks/bench_scoring.py; figures
        in benchmarks/README.md)."""
        if self._kernels is False:
            kernels = None
            if self.n_postings <= KERNEL_MAX_POSTINGS and self.n_docs < 2**31:
                try:
                    from scipy.sparse import _sparsetools as st

                    kernels = (st.csr_row_index, st.csc_matvec,
                               self.offsets.astype(np.int32), self._docs.view(np.int32))
                except (ImportError, AttributeError):
                    log.debug("scipy.sparse._sparsetools unavailable: slicing posting runs")
            self._kernels = kernels  # one assignment: other threads see False or the result
        return self._kernels

    def postings_touched(self, q: SparseVec) -> int:
        """How many postings scoring ``q`` reads (the cost driver)."""
        idx = np.unique(np.asarray(q[0], np.int64))
        return int((self.offsets[idx + 1] - self.offsets[idx]).sum())

    def search(self, q: SparseVec) -> tuple[np.ndarray, np.ndarray]:
        """Full ranking: (order int64 best first, scores float32 in database order).
        Ties (zero-score images included) keep database order."""
        s = self.scores(q)
        return rank_scores(s), s

    def asmk_scores(self, words: np.ndarray, signatures: np.ndarray, alpha: float,
                    tau: float, n_bits: int, query_weights: np.ndarray | None = None
                    ) -> np.ndarray:
        """kernel = asmk: scores (float32, database order) of one aggregated query
        (:func:`lib.index.asmk.aggregate`) against this index's signatures; with
        ``query_weights`` (one per query word) the weighted kernel."""
        from lib.index.asmk import score_postings

        if (self.asmk_signatures is None or self.asmk_weights is None
                or self.asmk_offsets is None or self.asmk_docs is None):
            raise UserError(f"{self.path}: this index has no ASMK signatures (built with "
                            "kernel = bow); rerun step C with kernel = asmk")
        return score_postings(words, signatures, self.asmk_offsets, self.asmk_docs,
                              self.asmk_signatures, self.asmk_weights, self.n_docs, alpha,
                              tau, n_bits, per_doc=False, query_weights=query_weights)

    def search_top(self, q: SparseVec, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``k`` entries of :meth:`search`'s order (same tie rule), and all
        scores. O(n_docs) instead of a full sort."""
        s = self.scores(q)
        return top_k(s, k), s


def top_k(s: np.ndarray, k: int) -> np.ndarray:
    """``rank_scores(s)[:k]`` without sorting everything.

    The scores are viewed as a (B x n/B) matrix; if ``t`` is the k-th largest column
    maximum, k columns hold a score >= t, so the k-th largest score is >= t and every
    score that can rank in the top k lies in a column whose maximum is >= t (or in the
    < B leftover scores). Only those ~k columns are gathered and ranked exactly. The
    column maxima are one vectorised pass (an element-wise max of B contiguous rows), so
    the cost is O(n_docs) plus a sort of ~B*k scores instead of a sort of n_docs
    (timed against the full ranking by benchmarks/bench_scoring.py; figures in
    benchmarks/README.md)."""
    s = np.asarray(s)
    n = s.size
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, np.int64)
    b = min(TOP_K_ROWS, n // (4 * k))
    if b < 2:
        return rank_scores(s)[:k]
    g = n // b  # columns; g >= 4k
    colmax = s[:b * g].reshape(b, g).max(axis=0)
    t = np.partition(colmax, g - k)[g - k]
    cols = np.flatnonzero(colmax >= t)
    cand = (np.arange(b, dtype=np.int64)[:, None] * g + cols).ravel()
    if b * g < n:
        cand = np.concatenate([cand, np.arange(b * g, n)])
    sc = s[cand]
    keep = np.flatnonzero(sc >= t)
    cand, sc = cand[keep], sc[keep]  # ascending database indices
    if cand.size > k:
        # fewer than k scores lie above the exact k-th one: sort those; its ties follow
        # in database order, which cand already has (no sort of a large tie, e.g. when
        # fewer than k images score above zero)
        kth = np.partition(sc, sc.size - k)[sc.size - k]
        above = np.flatnonzero(sc > kth)
        tied = np.flatnonzero(sc == kth)[:k - above.size]
        ca, sa = cand[above], sc[above]
        return np.concatenate([ca[np.lexsort((ca, -sa))], cand[tied]])
    return cand[np.lexsort((cand, -sc))]
