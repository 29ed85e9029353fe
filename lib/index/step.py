"""Step C's entry point: assignment maps and the inverted file of the database
(``bow_pipeline/C_bow_representation.py`` is its command line).

Inputs: step A's feature store, step B's models (path_models: pca.npz, codebook.npy),
the ground truth (for the database order). Every artefact's metadata is checked against
the settings first (network, layers, input size, ..., pca_dim, n_centers); a mismatch
stops with the field named.

Work: for each database image, its maps upsampled to ``new_dim`` (bilinear, aligned
corners) -> local features L2 -> PCA-whitening -> L2 -> nearest word, exact or
approximate (``assignment``; the approximate search, a PQ fast-scan shortlist re-ranked
exactly, is tuned on a sample to agree with exact search on >= 97 % of features).
Resumable: images already in the assignment store are skipped; each batch is one
transaction. Then one BoW vector per image (``weighting``: centre prior or counts,
L2-normalised; ``idf`` optional) goes into the inverted file, in database order.

Streaming (stream_distractors = true, for the 100k/1M distractor sets): the distractor
images (ids "distractors/...", from path_distractors) that are not in the feature store
are decoded, run through the network and assigned in one pass (lib/index/streaming.py) before
the inverted file is built; only their word maps are stored, never their float maps.
Same checks and resume as above; unreadable distractors are listed in
assignments.corrupted.txt and left out. Step A then skips the distractors.

Outputs (path_output):
  assignments.lmdb/   word map (H x W, uint16 for K <= 65,536) + original size per image id
  assignments.corrupted.txt  (streaming only) image_id<TAB>reason of unreadable distractors
  index/              inverted file (see lib/index/inverted_file.py and docs/formats.md)
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lib.artefacts import library_versions, output_lock
from lib.cluster.engine import LazyEngine
from lib.errors import ArtefactMismatchError, UserError
from lib.index.assignment_store import AssignmentStore
from lib.index.bow import SparseVec
from lib.index.encoding import database_vector, weights_of_words, word_map_records
from lib.pipeline import StepResult
from lib.provenance import (
    assignment_record,
    check_assignment_record,
    check_provenance,
    expected_provenance,
    load_models,
)
from lib.settings import Settings
from lib.vocabulary.codebook import Codebook

log = logging.getLogger("blcf.C")
BATCH_IMAGES = 32  # images per assignment call and per LMDB transaction
TUNE_FEATURES = 10000  # features used to tune (and report) approximate agreement


def _features(reader: Any, sizes: dict[str, tuple[int, int]], image_id: str,
              strength: bool = False
              ) -> tuple[np.ndarray, tuple[int, int], np.ndarray | None, tuple[int, int]]:
    """(L2-PCA-L2 features (H*W, d), map (H, W), cell strength (H, W) when asked (for
    ``keep_cells``) else None, original (H0, W0)) of one image."""
    feats, hw, st = reader.features_shape_strength(image_id, strength)
    h0, w0 = sizes[image_id]
    return np.asarray(feats, np.float32), (int(hw[0]), int(hw[1])), st, (int(h0), int(w0))


def tune_sample(reader: Any, sizes: dict[str, tuple[int, int]], ids: list[str],
                seed: int) -> np.ndarray:
    """A fixed sample of features (the first database images, seeded rows), so that a
    resumed run tunes the approximate search exactly as the first run did."""
    rows, total = [], 0
    for i in ids[:16]:
        f = _features(reader, sizes, i)[0]
        rows.append(f)
        total += len(f)
        if total >= 4 * TUNE_FEATURES:
            break
    if not rows:
        return np.zeros((0, 1), np.float32)
    x = np.concatenate(rows)
    rng = np.random.default_rng(seed)
    return x[np.sort(rng.choice(len(x), min(TUNE_FEATURES, len(x)), replace=False))]


def open_assignments(path: Path, expected: dict[str, Any]) -> AssignmentStore:
    """The assignment store, resumed when it was made with the same inputs; rebuilt (with
    a warning naming the field) when the models or reader settings changed."""
    if (path / "data.mdb").exists():
        st = AssignmentStore(path, readonly=False)
        try:
            check_assignment_record(expected, st.meta, str(path))
        except ArtefactMismatchError as e:
            log.warning("%s; rebuilding the assignment store", e)
            st.close()
            shutil.rmtree(path)
        else:
            return st
    return AssignmentStore.create(path, expected)


def assign_all(todo: list[str], reader: Any, sizes: dict[str, tuple[int, int]],
               cb: Codebook, out: AssignmentStore, keep_cells: float = 1.0) -> int:
    """Assign ``todo`` in batches (one codebook call and one transaction per batch);
    ``keep_cells`` < 1 drops each image's weaker cells (``word_map_records``)."""
    n_bits = out.meta.get("asmk_bits")  # kernel = asmk: signatures go with the maps
    done = 0
    with tqdm(total=len(todo), desc="assigning", unit="img", mininterval=2.0,
              disable=None, leave=False) as bar:
        for s in range(0, len(todo), BATCH_IMAGES):
            batch = [(i, *_features(reader, sizes, i, keep_cells < 1.0))
                     for i in todo[s:s + BATCH_IMAGES]]
            out.put_many(word_map_records(batch, cb, keep_cells, n_bits))
            done += len(batch)
            bar.update(len(batch))
    return done


def write_signatures(folder: Path, asg: AssignmentStore, present: list[str],
                     n_bits: int, n_words: int, weighting: str | None = None) -> None:
    """kernel = asmk: the postings of the aggregated images (one per image and distinct
    word, word-major, docs ascending, like the BoW postings), each with its signature and
    its weight: 1/sqrt(number of words of the image) (the reference kernel), or with
    ``weighting`` (``asmk_weighting = bow``) the word's weight in the image's BoW vector
    (``centre_prior`` or ``counts``, 0 for a word BoW drops). Their own offsets and docs
    because BoW
    drops words whose weight is zero (centre prior at the border) and ASMK keeps every
    word. Two passes over the assignment store: counts, then a cursor per word places
    each image's postings straight into memory-mapped arrays, in bounded memory."""
    from numpy.lib.format import open_memmap

    from lib.index.asmk import signature_bytes
    from lib.index.inverted_file import (
        ASMK_DOCS,
        ASMK_OFFSETS,
        ASMK_SIGNATURES,
        ASMK_WEIGHTS,
    )

    def signatures(with_map: bool
                   ) -> Iterator[tuple[int, np.ndarray | None, np.ndarray, np.ndarray]]:
        for d, image_id in enumerate(present):
            if with_map:  # one read and one checksum for the map and the signatures
                words, _, sig = asg.get_both(image_id)
            else:
                words, sig = None, asg.get_signature(image_id)
            if sig is None or sig[1].shape[1] != signature_bytes(n_bits):
                raise UserError(f"{asg.path}: image '{image_id}' has no {n_bits}-bit ASMK "
                                "signatures; delete the assignment store and rerun step C")
            yield d, words, sig[0].astype(np.int64), sig[1]

    counts = np.zeros(n_words, np.int64)
    for _, _, uw, _ in signatures(False):
        counts[uw] += 1
    offsets = np.zeros(n_words + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    n_post = int(offsets[-1])
    docs = open_memmap(folder / ASMK_DOCS, "w+", np.uint32, (n_post,))
    sigs = open_memmap(folder / ASMK_SIGNATURES, "w+", np.uint8,
                       (n_post, signature_bytes(n_bits)))
    weights = open_memmap(folder / ASMK_WEIGHTS, "w+", np.float32, (n_post,))
    cursor = offsets[:-1].copy()
    for d, words, uw, sg in tqdm(signatures(weighting is not None), total=len(present),
                                 desc="ASMK signatures", unit="img", mininterval=2.0,
                                 disable=None, leave=False):
        pos = cursor[uw]
        docs[pos] = d
        sigs[pos] = sg
        cursor[uw] += 1
        if weighting is None:
            weights[pos] = 1.0 / np.sqrt(uw.size)
        else:
            weights[pos] = weights_of_words(database_vector(words, weighting, n_words), uw)
    for a in (docs, sigs, weights):
        a.flush()
    del docs, sigs, weights
    np.save(folder / ASMK_OFFSETS, offsets, allow_pickle=False)


def check_index_ids(ids: list[str], where: Any) -> None:
    """The ids the inverted file will list one per line: no line breaks, no duplicates
    (the checks of InvertedFile.build, made before the assignment work)."""
    bad = next((i for i in ids if "\n" in i or "\r" in i), None)
    if bad is not None:
        raise UserError(f"{where}: image id {bad!r} contains a line break; rename the image "
                        "and fix the ground truth")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise UserError(f"{where}: image id {dup!r} appears more than once in the database")


def build_index(settings: Settings) -> StepResult:
    """Step C on validated settings: check the inputs, assign (resuming), stream the
    distractors when asked, build the inverted file; all under the output lock."""
    from lib.features.feature_store import FeatureStore
    from lib.features.local_features import LocalFeatureReader
    from lib.features.scales import image_vector
    from lib.groundtruth.loader import load_ground_truth
    from lib.index.inverted_file import InvertedFile

    s = settings
    t0 = time.perf_counter()
    prov = expected_provenance(s)
    pca, cb = load_models(s)
    fpath = FeatureStore.path_for(s)
    store = FeatureStore(fpath) if Path(fpath).exists() else None
    if store is not None:
        check_provenance(prov, store.meta, str(fpath), "rerun step A with these settings")
    db_ids = load_ground_truth(s).db_ids
    check_index_ids(db_ids, s.path_gt)  # before any assignment work, not at the end
    out_dir = Path(s.path_output)
    apath = AssignmentStore.path_for(s)
    expected = assignment_record(s, pca, cb)
    with output_lock(out_dir, "C"), contextlib.ExitStack() as stack:
        if store is not None:
            stack.callback(store.close)
        asg = open_assignments(apath, {**expected, **_extra_meta(s)})
        # the Dask cluster of settings' cluster, started when there is work to share
        engine = LazyEngine(s, stack)
        stack.callback(asg.close)
        try:
            sizes = store.sizes() if store is not None else {}
            # one reader for tuning and assigning (no store: no sizes, nothing to do)
            reader = None if store is None else LocalFeatureReader(
                store, list(s.new_dim) if s.new_dim else None, l2norm=s.l2norm, pca=pca)
            if s.assignment == "approximate":
                _tune(s, cb, asg, reader, sizes, db_ids)
            streamed = {"streamed": 0, "corrupt": 0}
            if s.stream_distractors:
                streamed = _stream(s, pca, cb, asg, db_ids, sizes, engine)
            todo = [i for i in db_ids if i not in asg]
            missing = [i for i in todo if i not in sizes]
            if missing:
                log.warning("%d database images have neither features nor an assignment "
                            "map (unreadable in step A?) and are left out, e.g. %s",
                            len(missing), ", ".join(missing[:5]))
            todo = [i for i in todo if i in sizes]  # empty without a feature store
            n_new = _assign(s, cb, asg, [i for i in db_ids if i in sizes], todo, reader,
                            sizes, engine)
            present = [i for i in db_ids if i in asg]
            asg.set_meta({**asg.meta, "count": len(asg)})
            scaled = _assign_scales(s, pca, cb, present, stack, engine)

            def vectors() -> Iterator[SparseVec]:
                for i in present:
                    yield image_vector(i, asg, scaled, s.weighting, cb.k)  # scales

            meta = {**expected, "weighting": s.weighting, "idf": s.idf,
                    **({"scales": list(s.scales)} if scaled else {}),
                    **({"asmk_weighting": s.asmk_weighting} if "kernel" in expected else {}),
                    "n_missing": len(missing), **_extra_meta(s)}
            finish = None
            if "asmk_bits" in expected:
                def finish(folder: Path) -> None:
                    write_signatures(folder, asg, present, int(expected["asmk_bits"]), cb.k,
                                     s.weighting if s.asmk_weighting == "bow" else None)
            # with several scales the vectors combine several stores: built here
            if engine.enabled and present and not scaled:
                inv = _index_on_cluster(engine.get(), s, asg, present, cb.k, meta, finish)
            else:
                inv = InvertedFile.build(out_dir / "index", vectors(), cb.k, present, meta,
                                         idf=s.idf, finish=finish)
        finally:
            stack.close()
    lines = []
    if s.stream_distractors:
        lines.append(f"C: {streamed['streamed']} distractors streamed (extracted + assigned, "
                     f"no feature maps kept) at {streamed.get('images_per_s', 0.0):.2f} "
                     f"images/s, {streamed['corrupt']} unreadable")
    lines.append(f"C: {n_new} images assigned ({len(present) - n_new - streamed['streamed']} "
                 "already stored, "
                 f"{len(missing)} missing), {s.assignment} assignment, {cb.k} words -> "
                 f"{apath}; inverted file of {inv.n_docs} images -> {out_dir / 'index'} in "
                 f"{time.perf_counter() - t0:.1f} s")
    counts = {"assigned": n_new, "already_stored": len(present) - n_new - streamed["streamed"],
              "missing": len(missing), "streamed": streamed["streamed"],
              "streamed_corrupt": streamed["corrupt"], "indexed": inv.n_docs, "words": cb.k}
    return StepResult("C", "\n".join(lines), (apath, out_dir / "index"), counts,
                      time.perf_counter() - t0)


def _assign_scales(s: Any, pca: Any, cb: Codebook, present: list[str],
                   stack: contextlib.ExitStack, engine: Any
                   ) -> list[tuple[float, AssignmentStore]]:
    """The extra scales of ``scales``: each one's feature store (step A) assigned into its
    own assignment store with the same models, resuming like scale 1 (on the cluster
    when there is one). Returns (scale, open store) per extra scale; an image without
    features at a scale (unreadable there) keeps its other scales."""
    from lib.features.feature_store import FeatureStore
    from lib.features.local_features import LocalFeatureReader
    from lib.features.scales import assignment_path, at_scale, extra_scales

    out = []
    for sc in extra_scales(s):
        ss = at_scale(s, sc)
        fpath = FeatureStore.path_for(ss)
        if not (Path(fpath) / "data.mdb").exists():
            raise UserError(f"{fpath}: no feature store for scale {sc:g} of 'scales'; run "
                            "step A with these settings")
        store = stack.enter_context(FeatureStore(fpath))
        check_provenance(expected_provenance(ss), store.meta, str(fpath),
                         "rerun step A with these settings")
        asg = open_assignments(assignment_path(s, sc),
                               {**assignment_record(ss, pca, cb), **_extra_meta(s)})
        stack.callback(asg.close)
        sizes = store.sizes()
        if s.stream_distractors:  # the distractors of this scale, like scale 1's
            _stream(s, pca, cb, asg, present, sizes, engine, scale=sc)
        absent = sum(i not in sizes and i not in asg for i in present)
        if absent:
            log.warning("scale %g: %d database images have no features at this scale "
                        "(unreadable in step A?); their vectors use their other scales",
                        sc, absent)
        reader = LocalFeatureReader(store, list(ss.new_dim) if ss.new_dim else None,
                                    l2norm=ss.l2norm, pca=pca)
        _assign(s, cb, asg, [i for i in present if i in sizes],
                [i for i in present if i not in asg and i in sizes], reader, sizes, engine,
                scale=sc)
        asg.set_meta({**asg.meta, "count": len(asg)})
        out.append((sc, asg))
    return out


def _index_on_cluster(engine: Any, s: Any, asg: AssignmentStore, present: list[str],
                      n_words: int, meta: dict[str, Any], finish: Any) -> Any:
    """The inverted file from partitions the workers build (one per shard), merged here
    with the merge of :meth:`InvertedFile.build`: the same files."""
    from lib.cluster.shards import partitions_on_cluster
    from lib.index.inverted_file import merge_partitions

    out_dir = Path(s.path_output)
    asg.env.sync(True)  # the workers read the committed store from the shared filesystem
    parts, _ = partitions_on_cluster(engine, s, asg.path, present, n_words,
                                     out_dir / ".index.parts")
    try:
        t0 = time.perf_counter()
        inv = merge_partitions(parts, out_dir / "index", present, meta, idf=s.idf,
                               finish=finish)
        dt = time.perf_counter() - t0
        log.info("C: %d partitions merged in %.2f s", len(parts), dt,
                 extra={"cluster_timing": {"what": "C: index merge", "merge_s": dt}})
        return inv
    finally:
        shutil.rmtree(out_dir / ".index.parts", ignore_errors=True)


def _tune(s: Any, cb: Codebook, asg: AssignmentStore, reader: Any,
          sizes: dict[str, tuple[int, int]], db_ids: list[str]) -> None:
    """Approximate assignment: the shortlist length recorded in the store, or tuned on a
    fixed sample of stored features (before any streaming, so that streamed and stored
    images are assigned with the same search)."""
    if "ef_search" in asg.meta:  # written by the HNSW search this project used before
        raise UserError(f"{AssignmentStore.path_for(s)}: made by an older approximate search "
                        "(HNSW); delete it and rerun step C")
    if "n_candidates" in asg.meta:
        cb.n_candidates = int(asg.meta["n_candidates"])
        return
    if reader is None or not sizes:
        return
    agree = cb.tune(tune_sample(reader, sizes, [i for i in db_ids if i in sizes], s.seed))
    asg.set_meta({**asg.meta, "n_candidates": cb.n_candidates, "tuned_agreement": agree})


def _assign(s: Any, cb: Codebook, asg: AssignmentStore, ids: list[str], todo: list[str],
            reader: Any, sizes: dict[str, tuple[int, int]], engine: Any,
            scale: float = 1.0) -> int:
    """Assign ``todo`` (a subset of ``ids``, the images with features, database order)
    into ``asg``: on the cluster when there is one, else in this process with ``reader``
    (the features of ``scale``). Returns the number assigned."""
    if not todo:
        return 0
    if engine.enabled:
        from lib.cluster.shards import assign_on_cluster

        return int(assign_on_cluster(engine.get(), s, asg, ids, todo, cb.n_candidates,
                                     scale=scale)["assigned"])
    if scale != 1.0:
        log.info("scale %g: assigning %d images", scale, len(todo))
    return assign_all(todo, reader, sizes, cb, asg, float(s.keep_cells))


def _stream(s: Any, pca: Any, cb: Codebook, asg: AssignmentStore, db_ids: list[str],
            sizes: dict[str, tuple[int, int]], engine: Any = None,
            scale: float = 1.0) -> dict[str, Any]:
    """stream_distractors: the distractors without stored features go through the
    network and the codebook in one pass (lib/index/streaming.py); only word maps are
    kept. An extra ``scale`` of ``scales`` extracts at that scale with scale 1's models
    into that scale's store ``asg``."""
    from lib.features.scales import at_scale
    from lib.groundtruth.loader import DISTRACTOR_PREFIX
    from lib.index.streaming import stream_assignments

    ids = [i for i in db_ids if i.startswith(DISTRACTOR_PREFIX) and i not in sizes]
    if not ids:
        return {"streamed": 0, "corrupt": 0}
    if engine is not None and engine.enabled:
        from lib.cluster.shards import stream_on_cluster

        r = stream_on_cluster(engine.get(), s, ids, pca, cb, asg, scale=scale)
    elif scale != 1.0:
        r = stream_assignments(at_scale(s, scale), ids, pca, cb, asg, model_settings=s)
    else:
        r = stream_assignments(s, ids, pca, cb, asg)
    log.info("%sstreamed %d distractors at %.1f images/s on %s (%d already assigned)",
             "" if scale == 1.0 else f"scale {scale:g}: ", r["streamed"], r["images_per_s"],
             r["device"], r["skipped"])
    return r


def _extra_meta(s: Any) -> dict[str, Any]:
    return {"dataset": s.dataset, "settings_hash": s.step_hash("C"),
            "versions": library_versions()}
