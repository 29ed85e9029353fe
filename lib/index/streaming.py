"""Streaming the distractors through steps A and C in one pass (``stream_distractors``).

Why: 100k Flickr distractors (1M for R1M) would need about 0.35 MB each in the feature
store (float16 21x16x512 maps, 35 GB per 100k), yet step C only ever keeps their word
maps (about 2.7 KB each at 42x32 uint16). So for distractors the float maps never reach
the disk: each decoded batch goes through the network, is rounded to ``feature_dtype``
exactly as the feature store would round it, read back through the very same
:class:`lib.features.local_features.LocalFeatureReader` code (upsampling to ``new_dim``, L2 -> PCA
-> L2) and assigned with the existing codebook; only the assignment maps (+ original
sizes) are written. Because every arithmetic step is the normal path's, the stored maps
are identical to what A-then-C produces with the same PCA and codebook.

Reuse, not a copy: decoding (DataLoader workers), bucketing by input size, commit
grouping, exact resume and the corrupt-image handling are step A's own loop
(:func:`lib.features.extraction.fill_batches`); this module only swaps the sink that
receives finished batches (a feature store there, an assigner + assignment store here).

Checks: the PCA and codebook must match the settings' feature provenance and training
fields (:mod:`lib.provenance`), and the assignment store's metadata must name the same
provenance, ``new_dim``, ``l2norm`` and model hashes; a mismatch stops naming the field.
Unreadable distractors are listed in ``assignments.corrupted.txt`` (beside the store)
and skipped; they are retried on the next run, as in step A.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lib.errors import UserError
from lib.index.assignment_store import HEADER as ASG_HEADER
from lib.index.assignment_store import META_KEY as ASG_META_KEY
from lib.index.assignment_store import AssignmentStore
from lib.index.encoding import word_map_records
from lib.provenance import assignment_record, check_assignment_record
from lib.vocabulary.codebook import Codebook
from lib.vocabulary.pca import PCAWhitening

log = logging.getLogger(__name__)

# the assignment-store metadata fields that must agree with what the stream computes
_HINT = "delete the assignment store (assignments.lmdb) or rerun step C with these settings"


def stored_sizes(store: AssignmentStore) -> dict[str, tuple[int, int]]:
    """{image id: (H0, W0)} of every stored map, from the headers only (one cursor pass),
    so that resuming a million-image stream does not decode a million maps."""
    out: dict[str, tuple[int, int]] = {}
    with store.env.begin(buffers=True) as txn:
        for k, v in txn.cursor():
            k = bytes(k)
            if k != ASG_META_KEY:
                _, _, _, _, h0, w0 = ASG_HEADER.unpack_from(v)
                out[k.decode("utf-8")] = (int(h0), int(w0))
    return out


class _BatchMaps:
    """A one-batch, in-memory stand-in for the feature store, so that the words come out
    of :class:`LocalFeatureReader` itself (no second copy of its geometry to drift)."""

    def __init__(self, layers: Sequence[str], dtype: np.dtype) -> None:
        self.layers = list(layers)
        self.path = Path("<stream>")
        self.dtype = dtype
        self.maps: dict[str, tuple[dict[str, np.ndarray], tuple[int, int]]] = {}

    def put(self, image_id: str, maps: Mapping[str, np.ndarray], size: Sequence[int]) -> None:
        # the feature store's rounding: float32 -> feature_dtype -> float32 on read
        self.maps[image_id] = ({ly: np.asarray(maps[ly], self.dtype).astype(np.float32)
                                for ly in self.layers}, (int(size[0]), int(size[1])))

    def get(self, image_id: str) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
        return self.maps[image_id]


class AssigningSink:
    """Receives step A's finished batches (``put_many`` of (id, {layer: map}, (H0, W0)))
    and writes their word maps to the assignment store, one transaction per call."""

    def __init__(self, settings: Mapping[str, Any], pca: PCAWhitening, codebook: Codebook,
                 store: AssignmentStore) -> None:
        from lib.features.local_features import LocalFeatureReader

        dtype = np.dtype(np.float16 if settings["feature_dtype"] == "float16" else np.float32)
        self.mem = _BatchMaps(settings["layers"], dtype)
        nd = settings["new_dim"]
        self.reader = LocalFeatureReader(self.mem, list(nd) if nd else None,  # type: ignore[arg-type]
                                         l2norm=bool(settings["l2norm"]), pca=pca)
        self.codebook = codebook
        self.store = store
        self.keep_cells = float(settings["keep_cells"])
        self.assign_s = 0.0
        self.n_written = 0

    def put_many(self, records: Sequence[tuple[str, Mapping[str, np.ndarray], Any]]) -> None:
        if not records:
            return
        t0 = time.perf_counter()
        batch = []
        for image_id, maps, size in records:
            self.mem.put(image_id, maps, size)
            f, hw, st = self.reader.features_shape_strength(image_id, self.keep_cells < 1.0)
            batch.append((image_id, f, hw, st, self.mem.maps[image_id][1]))
        n_bits = self.store.meta.get("asmk_bits")  # kernel = asmk: signatures too
        out = word_map_records(batch, self.codebook, self.keep_cells, n_bits)
        self.mem.maps.clear()
        self.store.put_many(out)
        self.n_written += len(out)
        self.assign_s += time.perf_counter() - t0


def check_models(settings: Mapping[str, Any], pca: PCAWhitening, codebook: Codebook) -> None:
    """Refuse a PCA or codebook made from other features (network, layers, input size ...)
    or with other training fields, naming the field (``lib.provenance`` checks)."""
    from lib.provenance import check_codebook, check_pca, expected_provenance, models_paths

    p_pca, p_cb = models_paths(settings)
    prov = expected_provenance(settings)
    check_pca(pca, p_pca, settings, prov)
    check_codebook(codebook, p_cb, settings, prov, pca)


def stream_assignments(settings: Mapping[str, Any], image_ids: Sequence[str],
                       pca: PCAWhitening, codebook: Codebook, store: AssignmentStore,
                       stop_after_batches: int | None = None,
                       model_settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Decode, extract, assign and store the word maps of ``image_ids`` (normally the
    distractors) in ``store``, skipping ids already stored. Returns counts and timings.
    ``stop_after_batches`` simulates an interruption after that many batches (tests).
    ``model_settings``: the settings the models are checked against when ``settings``
    are an extra scale's (``scales``: the models are scale 1's)."""
    from lib.features.extraction import Extractor, fill_batches, split_bad_ids
    from lib.features.feature_store import write_corrupted

    t_start = time.perf_counter()
    ids = list(image_ids)
    if len(set(ids)) != len(ids):
        raise UserError("distractor list: duplicate image ids")
    check_models(settings if model_settings is None else model_settings, pca, codebook)
    check_assignment_record(assignment_record(settings, pca, codebook), store.meta,
                            str(store.path), _HINT)
    ids, bad_ids = split_bad_ids(ids)  # not usable as store keys: listed as corrupt
    stored = stored_sizes(store)
    stored = {i: stored[i] for i in ids if i in stored}
    todo = [i for i in ids if i not in stored]
    corrupt: dict[str, str] = dict(bad_ids)
    ext = Extractor(settings) if todo else None
    sink = AssigningSink(settings, pca, codebook, store)
    if todo:
        log.info("streaming %d images (%d already assigned)", len(todo), len(stored))
    res = fill_batches(ext, settings, sink, ids, stored, todo, corrupt, stop_after_batches,
                       desc="C: streaming distractors")
    if todo or corrupt:
        write_corrupted(store.path, corrupt.items())
    loop_s = res["loop_s"]
    n_new = sink.n_written
    return {"streamed": n_new, "skipped": len(stored), "corrupt": len(corrupt),
            "corrupt_ids": sorted(corrupt), "interrupted": res["interrupted"],
            "seconds": time.perf_counter() - t_start, "loop_seconds": loop_s,
            "forward_seconds": res["forward_s"], "assign_seconds": sink.assign_s,
            "wait_seconds": res["wait_s"],
            "images_per_s": n_new / loop_s if loop_s > 0 else 0.0,
            "device": str(ext.device) if ext else "-"}
