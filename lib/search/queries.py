"""Query preparation shared by the BoW ranking and the pooling baseline.

Why here and not in the scripts: both D scripts (and the end-to-end test) need the same
augmentation geometry, the same query vectors and the same network pass as the database;
keeping them in one place is what makes query and database comparable.

Augmentation (``augmentation`` setting, cumulative, spec §1.10):
0 the image; 1 + its horizontal flip; 2 + the 1.5x centre crop (the image resized by 1.5,
then the centred crop of the original size, integer offsets); 3 + the flipped crop (the
crop of the flipped image). Boxes and mask images move with the image; a variant whose box
leaves the crop contributes nothing.

Query vectors: masking 0-2 concatenate the selected words of every variant into one
count histogram; masking 3 sums the variants' weighted histograms (per word the sum of its
cells' weights). Both are then L2-normalised (the original concatenated (word, weight)
lists, which the index summed - the same vector before normalisation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from lib.features.local_features import l2n
from lib.index.bow import SparseVec, bow_vector
from lib.search.geometry import Box, Cells, box_to_cells, resize_bilinear

log = logging.getLogger(__name__)

ZOOM = 1.5  # the original's get_center_crop(p=0.5)


@dataclass(frozen=True)
class Variant:
    """One augmented view of a query: optional horizontal flip, then optional zoom."""

    name: str
    flip: bool = False
    zoom: float = 1.0


VARIANTS: tuple[Variant, ...] = (
    Variant("orig"), Variant("flip", flip=True), Variant("crop", zoom=ZOOM),
    Variant("flipcrop", flip=True, zoom=ZOOM),
)


def variants_for(augmentation: int) -> tuple[Variant, ...]:
    """The views used for ``augmentation`` 0-3 (cumulative: 2 = image, flip and crop)."""
    if augmentation not in (0, 1, 2, 3):
        raise ValueError(f"augmentation must be 0-3, got {augmentation!r}")
    return VARIANTS[: augmentation + 1]


def crop_geometry(h: int, w: int, zoom: float) -> tuple[int, int, int, int]:
    """``(nh, nw, oy, ox)``: the zoomed size and the integer offset of the centred crop of
    size ``(h, w)`` inside it (the original indexed with floats, which modern numpy
    rejects)."""
    nh, nw = max(round(h * zoom), h), max(round(w * zoom), w)
    return nh, nw, (nh - h) // 2, (nw - w) // 2


def transform_box(box: Box, v: Variant, hw: Sequence[int]) -> Box | None:
    """The box (x1, y1, x2, y2; pixel edges) in the view ``v`` of an ``hw`` image, clipped
    to it; ``None`` when nothing of it is left in the view."""
    h, w = int(hw[0]), int(hw[1])
    x1, y1, x2, y2 = (float(c) for c in box)
    if v.flip:
        x1, x2 = w - x2, w - x1
    if v.zoom != 1.0:
        nh, nw, oy, ox = crop_geometry(h, w, v.zoom)
        sy, sx = nh / h, nw / w
        x1, x2 = x1 * sx - ox, x2 * sx - ox
        y1, y2 = y1 * sy - oy, y2 * sy - oy
    x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
    y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
    if x2 - x1 <= 0 or y2 - y1 <= 0 or (int(x2) - int(x1) <= 0 and int(y2) - int(y1) <= 0):
        return None
    return x1, y1, x2, y2


def transform_image(img: Image.Image, v: Variant) -> Image.Image:
    """The view ``v`` of a PIL image (same size as the input)."""
    if v.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if v.zoom != 1.0:
        w, h = img.size
        nh, nw, oy, ox = crop_geometry(h, w, v.zoom)
        img = img.resize((nw, nh), Image.Resampling.BILINEAR).crop((ox, oy, ox + w, oy + h))
    return img


def transform_mask(mask: np.ndarray, v: Variant) -> np.ndarray:
    """The view ``v`` of a full-resolution binary mask (bilinear zoom, threshold 0.5)."""
    m = np.asarray(mask, np.float32)
    if v.flip:
        m = m[:, ::-1]
    if v.zoom != 1.0:
        h, w = m.shape
        nh, nw, oy, ox = crop_geometry(h, w, v.zoom)
        m = (resize_bilinear(m, (nh, nw))[oy:oy + h, ox:ox + w] > 0.5).astype(np.float32)
    return np.ascontiguousarray(m)


def query_vector(words: Sequence[np.ndarray], weights: Sequence[np.ndarray | None],
                 n_words: int) -> SparseVec:
    """L2-normalised query BoW from the word maps of the views and their cell weights
    (``None`` = every cell with weight 1; binary weights = counts of the selected words,
    soft weights = per word the sum of its weights)."""
    if len(words) != len(weights):
        raise ValueError("one weight map (or None) per word map")
    ws, vs = [], []
    for wd, wt in zip(words, weights):
        wd = np.asarray(wd)
        if wt is None:
            wt = np.ones(wd.shape, np.float32)
        elif wt.shape != wd.shape:
            raise ValueError(f"weights {wt.shape} do not match the word map {wd.shape}")
        keep = np.asarray(wt) > 0
        ws.append(wd[keep].astype(np.int64))
        vs.append(np.asarray(wt, np.float64)[keep])
    if not ws:
        return bow_vector(np.zeros(0, np.int64), n_words)
    return bow_vector(np.concatenate(ws), n_words, np.concatenate(vs))


@dataclass
class EncodedQuery:
    """Everything step D needs about one query.

    ``words[i]``/``weights[i]`` belong to view ``variants[i]`` (the first is the image
    itself); ``cells`` is the query box on the first view's map, rounded outward (``None``
    = no box: the whole map), used by re-ranking; ``orig_hw`` is the image size."""

    name: str
    image: str
    orig_hw: tuple[int, int]
    variants: list[Variant]
    words: list[np.ndarray]
    weights: list[np.ndarray | None]
    cells: Cells | None
    vector: SparseVec
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def map_hw(self) -> tuple[int, int]:
        return int(self.words[0].shape[0]), int(self.words[0].shape[1])


def box_cells(bbox: Box | None, orig_hw: Sequence[int], map_hw: Sequence[int]) -> Cells | None:
    """The query box on the map rounded outward, or ``None`` without a box."""
    if bbox is None:
        return None
    return box_to_cells(bbox, orig_hw, map_hw)


# --------------------------------------------------------------------------- ranking helpers


def descending(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties by database order (stable sort)."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def ranking_scores(first_scores: np.ndarray, top_ids: np.ndarray | None = None,
                   top_scores: np.ndarray | None = None) -> np.ndarray:
    """Per-database-image scores (database order) whose descending order is the final
    list: the search scores, with the re-ranked images ``top_ids`` given their window
    scores lifted above every other score (``1 + max(rest) + s - min(0, min(s))``), so the
    re-ranked block comes first, sorted by window score, and the rest keeps its order."""
    out = np.asarray(first_scores, np.float32).copy()
    if top_ids is None or len(top_ids) == 0:
        return out
    top_ids = np.asarray(top_ids, np.int64)
    top = np.asarray(top_scores, np.float64)
    rest = np.delete(out, top_ids)
    lift = (float(rest.max()) if rest.size else 0.0) + 1.0
    out[top_ids] = (lift + top - min(float(top.min()), 0.0)).astype(np.float32)
    return out


# --------------------------------------------------------------------------- pooling


POOLINGS = ("sum", "max", "gem", "rmac")


def pool_map(maps: np.ndarray, method: str, p: float = 3.0,
             weights: np.ndarray | None = None, rmac_levels: int = 3) -> np.ndarray:
    """One global vector (C,) float32 of a (C, h, w) map, not normalised: sum (SPoC /
    uCroW), max (MAC), GeM (``mean(x^p)^(1/p)``) or R-MAC (``lib.learned.rmac``, no PCA here).
    ``weights`` (h, w) multiply every channel first (the query box of D_Pooling)."""
    x = np.asarray(maps, np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected maps (C, h, w), got shape {x.shape}")
    if weights is not None:
        if weights.shape != x.shape[1:]:
            raise ValueError(f"weights {weights.shape} do not match the map {x.shape[1:]}")
        x = x * np.asarray(weights, np.float32)[None]
    if method == "sum":
        return x.sum(axis=(1, 2), dtype=np.float64).astype(np.float32)
    if method == "max":
        return x.max(axis=(1, 2))
    if method == "gem":
        m = np.power(np.clip(x, 1e-6, None, dtype=np.float64), p).mean(axis=(1, 2))
        return np.power(m, 1.0 / p).astype(np.float32)
    if method == "rmac":
        from lib.learned.rmac import rmac

        return rmac(x, L=rmac_levels)
    raise ValueError(f"pooling '{method}': expected one of {', '.join(POOLINGS)}")


# --------------------------------------------------------------------------- BoW search


@dataclass
class Ranked:
    """One query's final ranking: ``order`` (database indices, best first), ``scores``
    (database order, consistent with ``order``, see :func:`ranking_scores`), the
    localisations of the last re-ranking (or ``None``) and per-stage times in ms."""

    order: np.ndarray
    scores: np.ndarray
    localisations: list[dict] | None
    timings: dict[str, float]


class BowSearcher:
    """Search -> [spatial re-ranking of the top ``top``] -> [GQE/LQE with the top
    ``qe_top`` -> search -> re-ranking again]. Re-ranking always scores windows against
    the original query's map and box (the expanded vector has no map); after query
    expansion it re-orders the new top ``top``, so the final block is spatially verified.

    ``index`` is a :class:`lib.index.inverted_file.InvertedFile`, ``store`` the database
    :class:`lib.index.assignment_store.AssignmentStore` (needed for re-ranking and GQE)."""

    def __init__(self, settings: Any, index: Any, store: Any | None) -> None:
        self.s = settings
        self.index = index
        self.store = store
        self.n_words = int(index.n_words)
        self.db_ids: list[str] = list(index.image_ids)
        self._db_vec_cache: dict[int, SparseVec] = {}
        needs_store = settings["rerank"] or settings["query_expansion"] != "none"
        if needs_store and store is None:
            raise ValueError("re-ranking and query expansion need the assignment store")

    def _maps(self, ids: np.ndarray) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        words, sizes = [], []
        for i in ids.tolist():
            w, hw = self.store.get(self.db_ids[i])
            words.append(w)
            sizes.append(hw)
        return words, sizes

    def _rerank(self, eq: EncodedQuery, order: np.ndarray, scores: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, list[dict], dict[int, SparseVec]]:
        from lib.search.geometry import cells_to_box
        from lib.search.rerank import rerank

        top = order[: min(int(self.s["top"]), order.size)]
        words, sizes = self._maps(top)
        res = rerank(eq.words[0], eq.cells, words, self.n_words,
                     ar_threshold=float(self.s["ar_threshold"]),
                     levels=int(self.s["pyramid_levels"]))
        final = ranking_scores(scores, top, res.scores)
        new_order = descending(final).astype(np.int64)
        pos = {int(i): j for j, i in enumerate(top.tolist())}
        locs = []
        for rank, i in enumerate(new_order[: top.size].tolist()):
            j = pos[i]
            box = cells_to_box(tuple(int(c) for c in res.windows[j]), sizes[j],
                               words[j].shape)
            locs.append({"image": self.db_ids[i], "rank": rank + 1,
                         "score": float(res.scores[j]),
                         "box": [round(float(c), 2) for c in box]})
        windows = {int(i): res.window_vectors[pos[int(i)]] for i in top.tolist()}
        return new_order, final, locs, windows

    def _db_vector(self, i: int) -> SparseVec:
        from lib.index.encoding import database_vector

        if i not in self._db_vec_cache:
            w, _ = self.store.get(self.db_ids[i])
            self._db_vec_cache[i] = database_vector(w, self.s["weighting"], self.n_words)
        return self._db_vec_cache[i]

    def rank(self, eq: EncodedQuery) -> Ranked:
        import time

        t: dict[str, float] = {"search": 0.0, "rerank": 0.0, "qe": 0.0}
        t0 = time.perf_counter()
        order, scores = self.index.search(eq.vector)
        t["search"] += time.perf_counter() - t0
        locs, windows = None, {}
        if self.s["rerank"]:
            t0 = time.perf_counter()
            order, scores, locs, windows = self._rerank(eq, order, scores)
            t["rerank"] += time.perf_counter() - t0
        qe = self.s["query_expansion"]
        if qe != "none":
            from lib.search import expansion

            t0 = time.perf_counter()
            n = min(int(self.s["qe_top"]), order.size)
            tops = order[:n].tolist()
            if qe == "gqe":
                q2 = expansion.gqe(eq.vector, [self._db_vector(i) for i in tops])
            else:  # lqe: the best windows of the re-ranked top (within the top `top`)
                q2 = expansion.lqe(eq.vector, [windows[i] for i in tops if i in windows])
            t["qe"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            order, scores = self.index.search(q2)
            t["search"] += time.perf_counter() - t0
            if self.s["rerank"]:
                t0 = time.perf_counter()
                order, scores, locs, _ = self._rerank(eq, order, scores)
                t["rerank"] += time.perf_counter() - t0
        return Ranked(order, scores, locs, {k: v * 1000.0 for k, v in t.items()})


# --------------------------------------------------------------------------- query encoder


class QueryEncoder:
    """Query image -> assignment maps of its views -> masked, L2-normalised query vector.

    Uses the same network, preprocessing, upsampling, PCA and codebook as the database
    (``load_models`` refuses models that disagree with the settings). Assignment maps are
    cached in ``<path_output>/query_words.lmdb`` (key ``<image id>#<view>``), so running
    D again with other masking / re-ranking / QE settings skips the network; the cache is
    rebuilt when its provenance differs. When a query image is also a database image
    (same image root) its unaugmented map is taken from the database assignment store."""

    def __init__(self, settings: Any, db_store: Any | None = None) -> None:
        from pathlib import Path

        from lib.provenance import assignment_record, load_models

        self.s = settings
        self.pca, self.codebook = load_models(settings)
        if db_store is not None and "n_candidates" in db_store.meta:
            # the approximate search as tuned for the database (step C)
            self.codebook.n_candidates = int(db_store.meta["n_candidates"])
        self.n_words = int(self.codebook.k)
        self.variants = list(variants_for(int(settings["augmentation"])))
        self.meta = assignment_record(settings, self.pca, self.codebook)
        self.cache_path = Path(settings["path_output"]) / "query_words.lmdb"
        same_root = settings["path_queries"] in (None, settings["path_images"])
        self.db_store = db_store if same_root else None
        self._extractor: Any = None
        self._cache: Any = None
        self.stats = {"cached": 0, "from_database": 0, "network": 0}

    # ---- cache
    def cache(self) -> Any:
        import shutil

        from lib.artefacts import canonical_hash
        from lib.index.assignment_store import AssignmentStore

        if self._cache is None:
            if (self.cache_path / "data.mdb").exists():
                with AssignmentStore(self.cache_path) as old:
                    stale = canonical_hash(old.meta) != canonical_hash(self.meta)
                if stale:
                    log.info("%s was made with other features or models; rebuilding it",
                             self.cache_path)
                    shutil.rmtree(self.cache_path)
            self._cache = AssignmentStore.create(self.cache_path, self.meta)
        return self._cache

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    # ---- network
    def _words_of_image(self, img: Any) -> np.ndarray:
        from lib.index.encoding import word_dtype, words_from_maps

        if self._extractor is None:
            from lib.features.extraction import Extractor

            self._extractor = Extractor(self.s)
        maps = combine_layers(self._extractor.extract(img), list(self.s["layers"]),
                              self.s["new_dim"])
        words = words_from_maps(maps, self.pca, self.codebook, bool(self.s["l2norm"]))
        return words.astype(word_dtype(self.n_words))

    def words(self, image_id: str) -> tuple[list[np.ndarray], tuple[int, int]]:
        """Assignment maps of every view of a query image, and its size (H0, W0)."""
        cache = self.cache()
        keys = [f"{image_id}#{v.name}" for v in self.variants]
        if all(k in cache for k in keys):
            got = [cache.get(k) for k in keys]
            self.stats["cached"] += 1
            return [g[0] for g in got], got[0][1]
        out: list[np.ndarray] = []
        hw: tuple[int, int] | None = None
        img = None
        for v, k in zip(self.variants, keys):
            if k in cache:
                w, hw = cache.get(k)
            elif v.name == "orig" and self.db_store is not None and image_id in self.db_store:
                w, hw = self.db_store.get(image_id)
                self.stats["from_database"] += 1
            else:
                if img is None:
                    from lib.features.images import load_image
                    from lib.groundtruth.loader import image_path

                    img = load_image(image_path(self.s, image_id, query=True),
                                     int(self.s["max_image_pixels"]))
                w = self._words_of_image(transform_image(img, v))
                hw = (int(img.size[1]), int(img.size[0]))
                self.stats["network"] += 1
            out.append(w)
        assert hw is not None
        cache.put_many([(k, w, hw) for k, w in zip(keys, out)])
        return out, hw

    # ---- vectors
    def encode(self, query: Any) -> EncodedQuery:
        """The query's views, weights, box cells and vector (``query``: a ground-truth
        ``Query``). A box that selects nothing raises UserError naming the query."""
        import time

        from lib.errors import UserError
        from lib.search.masks import check_box, mask_bounds, query_weights

        t0 = time.perf_counter()
        words, hw = self.words(query.image)
        t1 = time.perf_counter()
        mode = int(self.s["masking"])
        mask = None
        if getattr(query, "mask", None) is not None:
            mask = load_mask(query.mask, hw, query.name)
        else:
            check_box(query.bbox, hw, query.name)
        region = query.bbox is not None or mask is not None
        weights: list[np.ndarray | None] = []
        for v, w in zip(self.variants, words):
            if mode == 0 or not region:
                weights.append(None)
                continue
            if mask is not None:
                mv = transform_mask(mask, v)
                if not mv.any():
                    weights.append(np.zeros(w.shape, np.float32))
                    continue
                weights.append(query_weights(mode, None, hw, w.shape, mask=mv,
                                             query=query.name))
                continue
            bv = transform_box(query.bbox, v, hw)
            weights.append(np.zeros(w.shape, np.float32) if bv is None else
                           query_weights(mode, bv, hw, w.shape, query=query.name))
        cells = None
        if mode != 0 and region:
            bounds = mask_bounds(mask) if mask is not None else query.bbox
            cells = box_cells(bounds, hw, words[0].shape)
        vec = query_vector(words, weights, self.n_words)
        if vec[0].size == 0:
            raise UserError(f"query '{query.name}': no query words (box {query.bbox})")
        t2 = time.perf_counter()
        return EncodedQuery(query.name, query.image, hw, list(self.variants), words, weights,
                            cells, vec, {"encode": (t1 - t0) * 1000.0,
                                         "vector": (t2 - t1) * 1000.0})


def load_mask(path: Any, hw: Sequence[int], query: str) -> np.ndarray:
    """A query's mask image as a binary array of the image's size (TRECVid)."""
    from lib.errors import UserError

    try:
        with Image.open(path) as m:
            a = np.asarray(m.convert("L")) > 0
    except OSError as e:
        raise UserError(f"query '{query}': cannot read mask image {path} ({e})") from None
    if a.shape != (int(hw[0]), int(hw[1])):
        raise UserError(f"query '{query}': mask {path} is {a.shape[1]}x{a.shape[0]} but the "
                        f"image is {hw[1]}x{hw[0]}")
    return a.astype(np.float32)


def combine_layers(maps: dict[str, np.ndarray], layers: Sequence[str],
                   new_dim: Sequence[int] | None) -> np.ndarray:
    """One (C, H, W) map from the tapped layers, exactly as the database reader
    (``LocalFeatureReader.maps``): every layer resized to the first layer's map,
    concatenated along channels, then upsampled to ``new_dim`` oriented like that map
    (``None`` = native size)."""
    from lib.features.images import is_portrait, oriented
    from lib.features.local_features import upsample

    first = np.asarray(maps[layers[0]], np.float32)
    h, w = first.shape[1:]
    parts = [first] + [upsample(maps[ly], (h, w)) for ly in layers[1:]]
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if new_dim is not None:
        out = upsample(out, oriented(new_dim, is_portrait(w, h)))
    return out


# --------------------------------------------------------------------------- pooling ranks


def _native_maps(maps: Any, layers: Sequence[str]) -> np.ndarray:
    """The stored maps of one image as one (C, h, w) float32 array at native size."""
    if isinstance(maps, dict):
        return np.asarray(combine_layers(maps, layers, None), np.float32)
    return np.asarray(maps, np.float32)


def pooling_rankings(settings: Any, gt: Any, out_dir: Any, progress: Any = None) -> dict:
    """The pooling baseline (the paper's uCroW and its GeM / MAC / R-MAC cousins): one
    global vector per image from the stored maps at native size, L2 -> PCA-whitening fit
    on the database (``pooling_pca``) -> L2, cosine ranking. Query maps are multiplied
    by their ``masking`` weights (mode 1 soft, as the original) before pooling.
    Writes the ranking folder ``out_dir`` and returns its ``ranking.json`` record."""
    import time
    from pathlib import Path

    from lib.features.feature_store import FeatureStore
    from lib.features.images import load_image
    from lib.groundtruth.loader import image_path
    from lib.provenance import check_provenance, expected_provenance
    from lib.search.masks import query_weights
    from lib.search.rankings import write_ranking_folder
    from lib.vocabulary.pca import PCAWhitening

    s = settings
    if s.get("stream_distractors") and s.get("path_distractors"):
        # streamed distractors have word maps only: pooling would silently rank them last
        from lib.errors import UserError

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
        except Exception as e:  # unreadable in step A: ranked last
            from lib.errors import UserError

            if not isinstance(e, (KeyError, UserError)):
                raise
            raw.append(None)
            continue
        m = _native_maps(maps, layers)
        db_maps_ok[k] = True
        if method == "rmac" and s["pooling_pca"]:
            from lib.learned.rmac import region_vectors_for_pca

            regions.append(region_vectors_for_pca(m, L))
            raw.append(m)  # R-MAC needs its PCA before aggregation
        else:
            raw.append(pool_map(m, method, p, rmac_levels=L))
    if not db_maps_ok.any():
        from lib.errors import UserError

        raise UserError(f"{fpath}: none of the database images has stored features")
    pca = None
    if method == "rmac" and s["pooling_pca"]:
        from lib.learned.rmac import fit_rmac_pca, rmac

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
                from lib.features.extraction import Extractor

                extractor = Extractor(s)
            img = load_image(image_path(s, q.image, query=True), int(s["max_image_pixels"]))
            maps, hw = extractor.extract(img), (img.size[1], img.size[0])
        m = _native_maps(maps, layers)
        qmask = load_mask(q.mask, hw, q.name) if getattr(q, "mask", None) else None
        w = query_weights(mode, q.bbox, hw, m.shape[1:], pooling=True, mask=qmask,
                          query=q.name)
        if method == "rmac":
            from lib.learned.rmac import rmac

            v = rmac(m, L, pca, weights=w)
        else:
            v = pool_map(m, method, p, weights=w)
        v = l2n(v[None])
        if post is not None:
            v = l2n(post.transform(v))
        Q[qi] = v[0]
    S = Q @ X.T
    S[:, ~db_maps_ok] = -1.0
    orders = np.stack([descending(r) for r in S]) if len(S) else np.zeros((0, len(X)), int)
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


# --------------------------------------------------------------------------- BoW ranks


def _index_positions(index_ids: Sequence[str], db_ids: Sequence[str], what: str) -> np.ndarray:
    """Database position of every inverted-file document; refuses ids the ground truth
    does not know (an index built for another dataset)."""
    from lib.errors import ArtefactMismatchError

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


def bow_rankings(settings: Any, gt: Any, out_dir: Any, progress: Any = None) -> dict:
    """Step D for every query of ``gt``: checks the artefacts against the settings,
    encodes, searches, re-ranks / expands, and writes the ranking folder ``out_dir``.
    Database images missing from the index (unreadable in step A) come last (score -1).
    Returns the ``ranking.json`` record."""
    import time
    from pathlib import Path

    from lib.artefacts import check_fields
    from lib.index.assignment_store import AssignmentStore
    from lib.index.inverted_file import InvertedFile
    from lib.provenance import check_assignment_record
    from lib.search.rankings import write_ranking_folder

    s = settings
    apath = AssignmentStore.path_for(s)
    db_store = AssignmentStore(apath)
    encoder = None
    try:
        encoder = QueryEncoder(s, db_store)
        check_assignment_record(encoder.meta, db_store.meta, str(apath))
        ipath = Path(s["path_output"]) / "index"
        index = InvertedFile.load(ipath)
        what = str(ipath / "meta.json")
        check_assignment_record(encoder.meta, index.meta, what)
        check_fields({"weighting": s["weighting"], "idf": bool(s["idf"])}, index.meta,
                     ("weighting", "idf"), what, "rerun step C with these settings")
        if int(index.n_words) != encoder.n_words:
            check_fields({"n_words": encoder.n_words}, {"n_words": int(index.n_words)},
                         ("n_words",), what, "rerun step C")
        positions = _index_positions(index.image_ids, gt.db_ids, what)
        searcher = BowSearcher(s, index, db_store)
        n_db, n_q = len(gt.db_ids), len(gt.queries)
        scores = np.full((n_q, n_db), -1.0, np.float32)
        orders = np.zeros((n_q, n_db), np.int64)
        locs: dict[str, list[dict]] = {}
        stage = {"encode": 0.0, "vector": 0.0, "search": 0.0, "rerank": 0.0, "qe": 0.0}
        t_start = time.perf_counter()
        queries = gt.queries if progress is None else progress(
            gt.queries, desc="queries", unit="q", disable=None)
        for qi, q in enumerate(queries):
            eq = encoder.encode(q)
            r = searcher.rank(eq)
            for k, v in {**eq.timings, **r.timings}.items():
                stage[k] += v
            scores[qi, positions] = r.scores
            orders[qi] = descending(scores[qi])
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
        if encoder is not None:
            encoder.close()
        db_store.close()
    return meta
