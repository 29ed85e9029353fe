"""The pooling baseline of step D (the paper's uCroW and its GeM / MAC / R-MAC cousins).

One global vector per image from step A's stored maps at native size (layers combined
by the database reader), L2 -> PCA-whitening fit on the database (``pooling_pca``) ->
L2, cosine ranking with ties in database order. Query maps are multiplied by their
``masking`` weights (mode 1 soft, as the original) before pooling. No step B or C
artefact is used.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from lib.errors import UserError
from lib.features.extraction import Extractor
from lib.features.feature_store import FeatureStore
from lib.features.images import load_image
from lib.features.local_features import POOLINGS as MAP_POOLINGS
from lib.features.local_features import l2n, pool_maps
from lib.groundtruth.loader import image_path
from lib.learned.rmac import fit_rmac_pca, region_vectors_for_pca, rmac
from lib.provenance import check_provenance, expected_provenance
from lib.search.masks import query_weights
from lib.search.query_encoding import combined_maps, load_mask
from lib.search.rankings import rank_scores, write_ranking_folder
from lib.vocabulary.pca import PCAWhitening

log = logging.getLogger(__name__)

POOLINGS = (*MAP_POOLINGS, "rmac")


def pool_map(maps: np.ndarray, method: str, p: float = 3.0,
             weights: np.ndarray | None = None, rmac_levels: int = 3) -> np.ndarray:
    """One global vector (C,) float32 of a (C, h, w) map, not normalised: sum (SPoC /
    uCroW), max (MAC), GeM (``mean(x^p)^(1/p)``) or R-MAC (``lib.learned.rmac``, no PCA
    here). ``weights`` (h, w) multiply every channel first (the query box of the
    baseline). Sum, max and GeM are :func:`lib.features.local_features.pool_maps`, the
    pooling of the feature reader (the same float64 accumulation, bit for bit)."""
    x = np.asarray(maps, np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected maps (C, h, w), got shape {x.shape}")
    if method not in POOLINGS:
        raise ValueError(f"pooling '{method}': expected one of {', '.join(POOLINGS)}")
    if weights is not None:
        if weights.shape != x.shape[1:]:
            raise ValueError(f"weights {weights.shape} do not match the map {x.shape[1:]}")
        x = x * np.asarray(weights, np.float32)[None]
    if method == "rmac":
        return rmac(x, L=rmac_levels)
    return pool_maps(x, method, p)


def _native_maps(maps: dict[str, np.ndarray], layers: list[str]) -> np.ndarray:
    """The stored (or extracted) maps of one image as one (C, h, w) float32 array at
    native size."""
    return np.asarray(combined_maps(maps, layers, None), np.float32)


def pooling_rankings(settings: Any, gt: Any, out_dir: Any, progress: Any = None) -> dict:
    """The pooling baseline for every query of ``gt``: writes the ranking folder
    ``out_dir`` and returns its ``ranking.json`` record. Database images without stored
    maps (unreadable in step A) are ranked last (score -1)."""
    s = settings
    if s.get("stream_distractors") and s.get("path_distractors"):
        # streamed distractors have word maps only: pooling would silently rank them last
        src = getattr(s, "source", "settings")
        raise UserError(f"{src}: key 'stream_distractors': the pooling baseline needs "
                        "the float maps of every database image; run step A with "
                        "--set stream_distractors=false first")
    method, p, L = s["pooling"], float(s["gem_p"]), int(s.get("rmac_levels", 3))
    layers = list(s["layers"])
    fpath = FeatureStore.path_for(s)
    store = FeatureStore(fpath)
    prov = expected_provenance(s)
    check_provenance(prov, store.meta, str(fpath), "rerun step A with these settings")
    wrap = (lambda it, **kw: it) if progress is None else progress
    t0 = time.perf_counter()
    db_maps_ok = np.zeros(len(gt.db_ids), bool)
    raw: list[np.ndarray | None] = []
    regions: list[np.ndarray] = []
    for k, i in enumerate(wrap(gt.db_ids, desc="database", unit="img", disable=None)):
        try:
            maps, hw = store.get(i)
        except (KeyError, UserError):  # unreadable in step A: ranked last
            raw.append(None)
            continue
        m = _native_maps(maps, layers)
        db_maps_ok[k] = True
        if method == "rmac" and s["pooling_pca"]:
            regions.append(region_vectors_for_pca(m, L))
            raw.append(m)  # R-MAC needs its PCA before aggregation
        else:
            raw.append(pool_map(m, method, p, rmac_levels=L))
    if not db_maps_ok.any():
        raise UserError(f"{fpath}: none of the database images has stored features")
    pca = None
    if method == "rmac" and s["pooling_pca"]:
        pca = fit_rmac_pca(np.concatenate(regions), int(s["pca_dim"]), bool(s["whiten"]))
        raw = [None if m is None else rmac(m, L, pca) for m in raw]
    dim = next(v for v in raw if v is not None).shape[0]
    X = np.zeros((len(raw), dim), np.float32)
    for k, v in enumerate(raw):
        if v is not None:
            X[k] = v
    X = l2n(X)
    post = None
    if s["pooling_pca"] and method != "rmac":
        n_ok = int(db_maps_ok.sum())
        cap = min(int(s["pca_dim"]), X.shape[1], n_ok - 1)
        if cap < int(s["pca_dim"]):
            log.warning("pooling PCA: pca_dim %d capped to %d (%d images, %d-D vectors)",
                        int(s["pca_dim"]), cap, n_ok, X.shape[1])
        post = PCAWhitening.fit(X[db_maps_ok], cap, bool(s["whiten"]))
        X = l2n(post.transform(X))
        X[~db_maps_ok] = 0
    t_db = time.perf_counter() - t0

    extractor = None
    same_root = s["path_queries"] in (None, s["path_images"])
    mode = int(s["masking"])
    Q = np.zeros((len(gt.queries), X.shape[1]), np.float32)
    t1 = time.perf_counter()
    for qi, q in enumerate(wrap(gt.queries, desc="queries", unit="q", disable=None)):
        if same_root and q.image in store:
            maps, hw = store.get(q.image)
        else:
            if extractor is None:
                extractor = Extractor(s)
            img = load_image(image_path(s, q.image, query=True), int(s["max_image_pixels"]))
            maps, hw = extractor.extract(img), (img.size[1], img.size[0])
        m = _native_maps(maps, layers)
        qmask = load_mask(q.mask, hw, q.name) if getattr(q, "mask", None) else None
        w = query_weights(mode, q.bbox, hw, m.shape[1:], pooling=True, mask=qmask,
                          query=q.name)
        # R-MAC applies its region PCA (fit above) before aggregating
        v = (rmac(m, L, pca, weights=w) if method == "rmac"
             else pool_map(m, method, p, weights=w))
        v = l2n(v[None])
        if post is not None:
            v = l2n(post.transform(v))
        Q[qi] = v[0]
    S = Q @ X.T
    S[:, ~db_maps_ok] = -1.0
    # rank_scores: the stable descending sort of every ranking (ties in database order),
    # row by row; (0, n_db) int64 without queries
    orders = rank_scores(S)
    t_q = time.perf_counter() - t1
    n = max(len(gt.queries), 1)
    meta = {
        "method": f"pooling_{method}", "settings": s.as_dict() if hasattr(s, "as_dict")
        else dict(s), "provenance": prov, "pooling": method, "gem_p": p,
        "pca": None if post is None and pca is None else {
            "dim": int((post or pca).dim_out), "whiten": bool(s["whiten"]),
            "fit_on": "database (R-MAC: its region vectors)"},
        "dim": int(X.shape[1]), "n_queries": len(gt.queries), "n_db": len(gt.db_ids),
        "masking": mode, "ms_per_query": {"total": round(t_q * 1000.0 / n, 3)},
        "database_seconds": round(t_db, 2),
    }
    write_ranking_folder(Path(out_dir), [q.name for q in gt.queries], gt.db_ids, S, orders,
                         meta)
    return meta
