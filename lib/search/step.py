"""Step D's entry points: the BoW rankings (:func:`rank_bow`,
``bow_pipeline/D_rankings_BoW.py``) and the pooling baseline (:func:`rank_pooling`,
``bow_pipeline/D_rankings_Pooling.py``).

BoW inputs (path_output): step B's models (path_models), step C's assignment store and
inverted file, the ground truth's queries and their images (path_queries, default
path_images). Every artefact's metadata must agree with the settings (network, layers,
input size, PCA, codebook, weighting, idf, database ids); otherwise D refuses with the
field named and the step to rerun.

Per query (:class:`lib.search.query_encoding.QueryEncoder`): its image (and, with
``augmentation`` 1-3, its flip / 1.5x centre crop / flipped crop) goes through the same
network, upsampling, PCA and codebook as the database; the assignment maps are cached in
<path_output>/query_words.lmdb, keyed by the query file's content. The query vector
follows ``masking``: 0 all words (GS), 1 words inside the box (mask resized bilinearly,
> 0.5; LS), 2 the box rounded outward to map cells, 3 distance-transform weights. It is
scored through the inverted file; then (:class:`lib.search.searcher.BowSearcher`), in
this order: spatial re-ranking of the top ``top`` (``rerank``), query expansion with the
top ``qe_top`` (``query_expansion``: gqe = their full-image vectors, lqe = their best
windows), a new search with the expanded query, and re-ranking of its top ``top`` again
(the window weighting and the expansion set follow ``rerank_weighting``,
``rerank_global`` and ``qe_select``; the first search follows ``kernel``).

BoW outputs: <path_output>/bow/ (a ranking folder): queries.txt, lists/<query>.txt
(every database id, best first), scores.npy (float32 n_queries x n_db, database order),
ranking.json (settings, provenance, ms per query and stage) and, with re-ranking,
localisations.json (best window per re-ranked image, in original pixels).

Pooling baseline (:mod:`lib.search.pooling`): step A's feature store only (its metadata
must match the settings); each database image's maps (layers concatenated at the first
layer's native size) are pooled into one vector (``pooling``: sum = SPoC / the paper's
uCroW, max = MAC, gem = GeM with exponent ``gem_p``, rmac = R-MAC with ``rmac_levels``
scales), then L2 -> PCA-whitening fit on the database vectors (``pooling_pca``,
``pca_dim`` capped at the number of images - 1, ``whiten``) -> L2. Queries go through
the same network; their maps are multiplied by the ``masking`` weights (1: the box mask
resized bilinearly, not thresholded; 2: the box in whole cells; 3: distance-transform
weights) before pooling. Ranking by cosine similarity, ties in database order. Output:
<path_output>/pooling_<pooling>/, a ranking folder of the same format as bow/.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lib.artefacts import check_fields, output_lock
from lib.errors import ArtefactMismatchError, UserError
from lib.groundtruth.loader import load_ground_truth
from lib.index.assignment_store import AssignmentStore
from lib.index.inverted_file import InvertedFile
from lib.pipeline import StepResult
from lib.provenance import check_assignment_record
from lib.search.pooling import pooling_rankings
from lib.search.query_encoding import QueryEncoder
from lib.search.rankings import rank_scores, write_ranking_folder
from lib.search.searcher import BowSearcher
from lib.settings import Settings


def rank_bow(settings: Settings) -> StepResult:
    """Step D (BoW) on validated settings: the ranking folder <path_output>/bow, written
    under the output lock. ``counts``: queries, images, the query cache's hits and the
    ms per query."""
    s = settings
    gt = load_ground_truth(s)
    out = Path(s.path_output)
    t0 = time.perf_counter()
    with output_lock(out, "D"):
        res = bow_rankings(s, gt, out / "bow", progress=tqdm)
    dt = time.perf_counter() - t0
    summary = (f"D: {len(gt.queries)} queries ranked against {len(gt.db_ids)} images "
               f"(masking {s.masking}, augmentation {s.augmentation}, rerank {s.rerank}, "
               f"qe {s.query_expansion}) in {dt:.1f} s, "
               f"{res['ms_per_query']['total']:.1f} ms/query -> {out / 'bow'}")
    counts = {"queries": len(gt.queries), "images": len(gt.db_ids),
              "query_cache": dict(res["query_cache"]), "ms_per_query": res["ms_per_query"]}
    return StepResult("D", summary, (out / "bow",), counts, dt)


def rank_pooling(settings: Settings) -> StepResult:
    """Step D's pooling baseline on validated settings (``pooling`` names the method):
    the ranking folder <path_output>/pooling_<pooling>, written under the output lock.
    ``counts``: queries, images, the vector dimension and the ms per query."""
    s = settings
    gt = load_ground_truth(s)
    out = Path(s.path_output)
    folder = out / f"pooling_{s.pooling}"
    t0 = time.perf_counter()
    with output_lock(out, "D_pooling"):
        res = pooling_rankings(s, gt, folder, progress=tqdm)
    dt = time.perf_counter() - t0
    summary = (f"D_Pooling: {len(gt.queries)} queries, {s.pooling} pooling, "
               f"{res['dim']}-D vectors, masking {s.masking}, in "
               f"{dt:.1f} s ({res['ms_per_query']['total']:.1f} "
               f"ms/query) -> {folder}")
    counts = {"queries": len(gt.queries), "images": len(gt.db_ids), "dim": res["dim"],
              "ms_per_query": res["ms_per_query"]}
    return StepResult("D-pooling", summary, (folder,), counts, dt)


def _index_positions(index_ids: Sequence[str], db_ids: Sequence[str], what: str) -> np.ndarray:
    """Database position of every inverted-file document; refuses ids the ground truth
    does not know (an index built for another dataset)."""
    if list(index_ids) == list(db_ids):
        return np.arange(len(db_ids), dtype=np.int64)
    pos = {d: i for i, d in enumerate(db_ids)}
    bad = [d for d in index_ids if d not in pos]
    if bad:
        raise ArtefactMismatchError(f"{what}: field 'image_ids' holds '{bad[0]}' (and "
                                    f"{len(bad) - 1} more) that the ground truth's database "
                                    "does not list; rerun step C with these settings")
    p = np.array([pos[d] for d in index_ids], np.int64)
    if np.any(np.diff(p) <= 0):
        raise ArtefactMismatchError(f"{what}: field 'image_ids' is not in database order; "
                                    "rerun step C")
    return p


@dataclass
class BowParts:
    """The checked pieces of a BoW search of a finished run (steps B and C), shared by
    step D and the query service (``lib/service``), so both search with the same code."""

    db_store: AssignmentStore
    encoder: QueryEncoder
    index: InvertedFile
    searcher: BowSearcher
    index_path: Path
    scale_stores: list[AssignmentStore] = field(default_factory=list)  # extra ``scales``

    def close(self) -> None:
        self.encoder.close()
        self.db_store.close()
        for st in self.scale_stores:
            st.close()


def open_bow(settings: Any) -> BowParts:
    """Open step C's assignment store and inverted file and step B's models, and check
    them against the settings (feature provenance, models, ``weighting``, ``idf``,
    ``n_words``): a refusal names the field and the step to rerun."""
    from lib.features.scales import assignment_path, extra_scales

    s = settings
    apath = AssignmentStore.path_for(s)
    db_store = AssignmentStore(apath)
    encoder = None
    scale_stores: list[tuple[float, AssignmentStore]] = []
    try:
        for sc in extra_scales(s):  # ``scales``: step C's store of each extra scale
            p = assignment_path(s, sc)
            if not (p / "data.mdb").exists():
                raise UserError(f"{p}: no assignment store for scale {sc:g} of 'scales'; "
                                "rerun step C with these settings")
            scale_stores.append((sc, AssignmentStore(p)))
        encoder = QueryEncoder(s, db_store, [st for _, st in scale_stores])
        check_assignment_record(encoder.meta, db_store.meta, str(apath))
        for e, (_, st) in zip(encoder.scale_encoders, scale_stores):
            check_assignment_record(e.meta, st.meta, str(st.path))
        ipath = Path(s["path_output"]) / "index"
        index = InvertedFile.load(ipath)
        what = str(ipath / "meta.json")
        check_assignment_record(encoder.meta, index.meta, what)
        check_fields({"weighting": s["weighting"], "idf": bool(s["idf"]),
                      "scales": list(s["scales"])}, {"scales": [1.0], **index.meta},
                     ("weighting", "idf", "scales"), what, "rerun step C with these settings")
        if s["kernel"] == "asmk":
            check_fields({"asmk_weighting": s["asmk_weighting"]}, index.meta,
                         ("asmk_weighting",), what, "rerun step C with these settings")
        if int(index.n_words) != encoder.n_words:
            check_fields({"n_words": encoder.n_words}, {"n_words": int(index.n_words)},
                         ("n_words",), what, "rerun step C")
        searcher = BowSearcher(s, index, db_store, scale_stores)
    except BaseException:
        if encoder is not None:
            encoder.close()
        db_store.close()
        for _, st in scale_stores:
            st.close()
        raise
    return BowParts(db_store, encoder, index, searcher, ipath, [st for _, st in scale_stores])


def bow_rankings(settings: Any, gt: Any, out_dir: Any, progress: Any = None) -> dict:
    """The BoW rankings of every query of ``gt`` into the ranking folder ``out_dir``
    (no lock: :func:`rank_bow` takes it): checks the artefacts against the settings,
    encodes, searches, re-ranks / expands. Database images missing from the index
    (unreadable in step A) come last (score -1). Returns the ``ranking.json`` record."""
    s = settings
    bow = open_bow(s)
    try:
        encoder, index, searcher, ipath = bow.encoder, bow.index, bow.searcher, bow.index_path
        positions = _index_positions(index.image_ids, gt.db_ids, str(ipath / "meta.json"))
        n_db, n_q = len(gt.db_ids), len(gt.queries)
        scores = np.full((n_q, n_db), -1.0, np.float32)
        orders = np.zeros((n_q, n_db), np.int64)
        locs: dict[str, list[dict]] = {}
        stage = {"encode": 0.0, "vector": 0.0, "asmk": 0.0, "search": 0.0, "rerank": 0.0, "qe": 0.0}
        t_start = time.perf_counter()
        queries = gt.queries if progress is None else progress(
            gt.queries, desc="queries", unit="q", disable=None, leave=False)
        for qi, q in enumerate(queries):
            eq = encoder.encode(q)
            r = searcher.rank(eq)
            for k, v in {**eq.timings, **r.timings}.items():
                stage[k] += v
            scores[qi, positions] = r.scores
            orders[qi] = rank_scores(scores[qi])  # ties in database order
            if r.localisations is not None:
                locs[q.name] = r.localisations
        n = max(n_q, 1)
        ms = {k: round(v / n, 3) for k, v in stage.items()}
        ms["total"] = round((time.perf_counter() - t_start) * 1000.0 / n, 3)
        meta = {
            "method": "bow", "settings": s.as_dict() if hasattr(s, "as_dict") else dict(s),
            "provenance": encoder.meta, "index": {"path": str(ipath), "n_docs": index.n_docs,
                                                  "n_words": index.n_words},
            "n_queries": n_q, "n_db": n_db, "n_missing_from_index": n_db - len(positions),
            "ms_per_query": ms, "query_cache": dict(encoder.stats),
            "scores": "cosine; with re-ranking the re-ranked top get 1 + max(rest) + "
                      "window score; images missing from the index -1",
            "order": "search, rerank, query expansion, search, rerank",
        }
        write_ranking_folder(Path(out_dir), [q.name for q in gt.queries], gt.db_ids, scores,
                             orders, meta, localisations=locs if s["rerank"] else None)
    finally:
        bow.close()
    return meta
