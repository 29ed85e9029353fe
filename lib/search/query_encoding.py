"""Query image -> assignment maps of its views -> masked, L2-normalised query vector.

Why here: the query must go through exactly what the database went through in steps A-C
(network, preprocessing, layer combination, upsampling, PCA, codebook), so the encoder
reuses those pieces (:class:`LocalFeatureReader.maps`, :func:`words_from_maps`) and the
models checked by :func:`lib.provenance.load_models`.

Query vectors: masking 0-2 concatenate the selected words of every view into one count
histogram; masking 3 sums the views' weighted histograms (per word the sum of its cells'
weights). Both are then L2-normalised (the original concatenated (word, weight) lists,
which the index summed - the same vector before normalisation).

The query cache, ``<path_output>/query_words.lmdb`` (:class:`QueryWordCache`), holds the
assignment map of every view of every query image, so running D again with other
masking / re-ranking / QE settings skips the network. A record is keyed by the image id,
the view and the digest of the query file's bytes (:func:`cache_key`): a query photo
that was rewritten, or a ``path_queries`` that points at other photos, misses the cache
and is read again, and a missing photo fails like any missing image. The whole cache is
rebuilt when its metadata (the assignment record: features and models) differs.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lib.artefacts import canonical_hash
from lib.errors import UserError
from lib.features.extraction import Extractor
from lib.features.feature_store import FeatureStore
from lib.features.images import load_image
from lib.features.local_features import LocalFeatureReader, maps_to_features
from lib.groundtruth.loader import image_path
from lib.index.asmk import aggregate, centroid_index, query_words
from lib.index.assignment_store import AssignmentStore
from lib.index.bow import SparseVec, bow_vector, centre_prior
from lib.index.encoding import map_dtype, words_from_maps
from lib.provenance import asmk_bits, assignment_record, load_models
from lib.search.augmentation import (
    Variant,
    transform_box,
    transform_image,
    transform_mask,
    variants_for,
)
from lib.search.geometry import Box, Cells, box_to_cells
from lib.search.masks import check_box, mask_bounds, query_weights

log = logging.getLogger(__name__)

CACHE_NAME = "query_words.lmdb"
CACHE_KEY = "<image id>#<view>#<blake2b-128 of the query file's bytes>"


def query_vector(words: Sequence[np.ndarray], weights: Sequence[np.ndarray | None],
                 n_words: int) -> SparseVec:
    """L2-normalised query BoW from the word maps of the views and their cell weights
    (``None`` = every cell with weight 1; binary weights = counts of the selected words,
    soft weights = per word the sum of its weights). Cells holding ``n_words`` (dropped
    by ``keep_cells``) add nothing."""
    if len(words) != len(weights):
        raise ValueError("one weight map (or None) per word map")
    ws, vs = [], []
    for wd, wt in zip(words, weights):
        wd = np.asarray(wd)
        if wt is None:
            wt = np.ones(wd.shape, np.float32)
        elif wt.shape != wd.shape:
            raise ValueError(f"weights {wt.shape} do not match the word map {wd.shape}")
        keep = (np.asarray(wt) > 0) & (wd != n_words)
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
    # kernel = asmk: (unique words, signatures, word weights or None) of the features
    # inside the query region
    asmk: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    @property
    def map_hw(self) -> tuple[int, int]:
        return int(self.words[0].shape[0]), int(self.words[0].shape[1])


def box_cells(bbox: Box | None, orig_hw: Sequence[int], map_hw: Sequence[int]) -> Cells | None:
    """The query box on the map rounded outward, or ``None`` without a box."""
    if bbox is None:
        return None
    return box_to_cells(bbox, orig_hw, map_hw)


def load_mask(path: Any, hw: Sequence[int], query: str) -> np.ndarray:
    """A query's mask image as a binary array of the image's size (TRECVid)."""
    try:
        with Image.open(path) as m:
            a = np.asarray(m.convert("L")) > 0
    except OSError as e:
        raise UserError(f"query '{query}': cannot read mask image {path} ({e})") from None
    if a.shape != (int(hw[0]), int(hw[1])):
        raise UserError(f"query '{query}': mask {path} is {a.shape[1]}x{a.shape[0]} but the "
                        f"image is {hw[1]}x{hw[0]}")
    return a.astype(np.float32)


class _OneImage:
    """A feature-store stand-in holding the maps of one image that never went to a store
    (a query's network pass), so :func:`combined_maps` can hand them to the database's
    reader instead of repeating its layer combination."""

    path = "query feature maps"

    def __init__(self, maps: dict[str, np.ndarray]) -> None:
        self.maps = maps
        self.layers = list(maps)

    def get(self, image_id: str) -> tuple[dict[str, np.ndarray], None]:
        return self.maps, None


def combined_maps(maps: dict[str, np.ndarray], layers: Sequence[str],
                  new_dim: Sequence[int] | None) -> np.ndarray:
    """One (C, H, W) map from the tapped layers of one image, by the database reader
    itself (:meth:`LocalFeatureReader.maps`): every layer resized to the first layer's
    map, concatenated along channels, then upsampled to ``new_dim`` oriented like that map
    (``None`` = native size)."""
    reader = LocalFeatureReader(_OneImage(maps), new_dim, l2norm=False,  # type: ignore
                                layers=layers)
    return reader.maps("")


def file_digest(path: Path) -> str:
    """blake2b-128 (hex) of a file's bytes: what a query-cache record is bound to."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise UserError(f"{path}: cannot read the query image ({e.strerror or e})") from None
    return h.hexdigest()


def cache_key(image_id: str, view: str, digest: str) -> str:
    """The query-cache key of one view of one query file (:data:`CACHE_KEY`).

    Why the file's content and not its path or mtime: a run folder copied elsewhere (or
    made twice from the same photos) must hold the same records, key for key (the
    reliability and determinism tests compare them), and a photo rewritten with the same
    size and modification time (``rsync -t``, ``cp -p``, an archive) must still miss.
    Reading a query file costs far less than the network pass the cache saves."""
    return f"{image_id}#{view}#{digest}"


class QueryWordCache:
    """``<path_output>/query_words.lmdb``: an :class:`AssignmentStore` of query views
    (key :func:`cache_key`), opened lazily for writing and rebuilt when its metadata
    (``meta`` plus the key format) differs from this run's. Records of a rewritten photo
    stay until the next rebuild; nothing reads them."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.meta = {**meta, "key": CACHE_KEY}
        self._store: AssignmentStore | None = None

    def store(self) -> AssignmentStore:
        if self._store is None:
            if (self.path / "data.mdb").exists():
                with AssignmentStore(self.path) as old:
                    stale = canonical_hash(old.meta) != canonical_hash(self.meta)
                if stale:
                    log.info("%s was made with other features, models or keys; rebuilding it",
                             self.path)
                    shutil.rmtree(self.path)
            self._store = AssignmentStore.create(self.path, self.meta)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


class QueryEncoder:
    """Query image -> assignment maps of its views -> masked, L2-normalised query vector.

    Uses the same network, preprocessing, upsampling, PCA and codebook as the database
    (``load_models`` refuses models that disagree with the settings). Assignment maps are
    cached (:class:`QueryWordCache`). When a query image is also a database image (same
    image root) its unaugmented map is taken from the database assignment store."""

    def __init__(self, settings: Any, db_store: AssignmentStore | None = None,
                 scale_stores: Sequence[AssignmentStore | None] = (), *,
                 _parent: QueryEncoder | None = None, _scale: float = 1.0) -> None:
        """``scale_stores``: with several ``scales``, the database's assignment store of
        each extra scale (or None), for queries that are database images. ``_parent`` and
        ``_scale`` make the encoder of an extra scale: it uses its parent's checked models
        and backbone, and a query cache of its own."""
        from lib.features.scales import at_scale, extra_scales, query_cache_name

        self.s = settings
        self._parent = _parent
        self.pca, self.codebook = (load_models(settings) if _parent is None
                                   else (_parent.pca, _parent.codebook))
        if db_store is not None and "n_candidates" in db_store.meta:
            # the approximate search as tuned for the database (step C)
            self.codebook.n_candidates = int(db_store.meta["n_candidates"])
        self.n_words = int(self.codebook.k)
        self.variants = list(variants_for(int(settings["augmentation"])))
        self.meta = assignment_record(settings, self.pca, self.codebook)
        cache_name = CACHE_NAME if _parent is None else query_cache_name(_scale)
        self.cache = QueryWordCache(Path(settings["path_output"]) / cache_name, self.meta)
        # the other scales of ``scales``: an encoder each, whose vectors join this one's
        self.scales = [1.0, *extra_scales(settings)]
        stores = list(scale_stores) + [None] * (len(self.scales) - 1 - len(scale_stores))
        self.scale_encoders = [QueryEncoder(at_scale(settings, sc), st, _parent=self, _scale=sc)
                               for sc, st in zip(self.scales[1:], stores)]
        same_root = settings["path_queries"] in (None, settings["path_images"])
        self.db_store = db_store if same_root else None
        self._extractor: Extractor | None = None
        self.stats = {"cached": 0, "from_database": 0, "network": 0}
        self._reader: LocalFeatureReader | bool | None = False  # not opened yet
        if settings["kernel"] == "asmk":
            self.asmk_bits = asmk_bits(settings, self.codebook.dim)
            self._word_index = centroid_index(self.codebook.centroids)

    def close(self) -> None:
        self.cache.close()
        for e in self.scale_encoders:
            e.close()

    def _with_scales(self, eq: EncodedQuery, subs: list[EncodedQuery],
                     timed: Sequence[str]) -> EncodedQuery:
        """``eq`` with its vector combined with the extra scales' encodings ``subs``
        (``scales``) and their ``timed`` timings added to its own."""
        from lib.features.scales import combine

        for sub in subs:
            for k in timed:
                eq.timings[k] = eq.timings.get(k, 0.0) + sub.timings.get(k, 0.0)
        eq.vector = combine([eq.vector, *(sub.vector for sub in subs)], self.scales)
        return eq

    # ---- network
    def load_network(self) -> Extractor:
        """The network, built on first use; a long-lived caller (the query service) builds
        it once before its threads share the encoder. The extra scales' encoders use this
        backbone under their own input size (built here too)."""
        if self._parent is not None:  # an extra scale: the parent's backbone
            if self._extractor is None:
                self._extractor = Extractor(self.s, share=self._parent._own_network())
            return self._extractor
        for e in self.scale_encoders:
            e.load_network()
        return self._own_network()

    def _own_network(self) -> Extractor:
        if self._extractor is None:
            self._extractor = Extractor(self.s)
        return self._extractor

    def _words_of_image(self, img: Image.Image,
                        timings: dict[str, float] | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        maps = combined_maps(self.load_network().extract(img), list(self.s["layers"]),
                             self.s["new_dim"])
        t1 = time.perf_counter()
        words = words_from_maps(maps, self.pca, self.codebook, bool(self.s["l2norm"]),
                                float(self.s["keep_cells"]))
        if timings is not None:  # network vs PCA + nearest word, for the query service
            timings["extract"] = timings.get("extract", 0.0) + (t1 - t0) * 1000.0
            timings["assign"] = timings.get("assign", 0.0) + \
                (time.perf_counter() - t1) * 1000.0
        return words.astype(map_dtype(self.n_words, float(self.s["keep_cells"])))

    def image_words(self, img: Image.Image, image_id: str | None = None,
                    timings: dict[str, float] | None = None
                    ) -> tuple[list[np.ndarray], tuple[int, int]]:
        """Assignment maps of every view of a decoded image that need not belong to the
        dataset (``bow_pipeline/search.py``, ``serve.py``), and its size (H0, W0); the
        query cache is neither read nor written. As in :meth:`words`, when ``image_id``
        names a database image and the queries share the database's image root, the
        unaugmented view is the database's own map."""
        hw = (int(img.size[1]), int(img.size[0]))
        out: list[np.ndarray] = []
        for v in self.variants:
            if (v.name == "orig" and image_id is not None and self.db_store is not None
                    and image_id in self.db_store):
                w, hw = self.db_store.get(image_id)
                self.stats["from_database"] += 1
            else:
                w = self._words_of_image(transform_image(img, v), timings)
                self.stats["network"] += 1
            out.append(w)
        return out, hw

    def words(self, image_id: str) -> tuple[list[np.ndarray], tuple[int, int]]:
        """Assignment maps of every view of a query image, and its size (H0, W0). The
        query file must exist (UserError naming the image otherwise), even when every
        view is cached: the cache is keyed by its content."""
        path = image_path(self.s, image_id, query=True)
        digest = file_digest(path)
        cache = self.cache.store()
        keys = [cache_key(image_id, v.name, digest) for v in self.variants]
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
                    img = load_image(path, int(self.s["max_image_pixels"]))
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
        t0 = time.perf_counter()
        words, hw = self.words(query.image)
        t1 = time.perf_counter()
        mask = None
        if getattr(query, "mask", None) is not None:
            mask = load_mask(query.mask, hw, query.name)
        eq = self.encode_words(query.name, query.image, words, hw, query.bbox, mask)
        eq.timings = {"encode": (t1 - t0) * 1000.0, **eq.timings}
        if self.scale_encoders:
            eq = self._with_scales(eq, [e.encode(query) for e in self.scale_encoders],
                                   ("encode", "vector"))
        return eq

    def encode_image(self, img: Image.Image, bbox: Box | None, name: str,
                     image_id: str | None = None,
                     mask: np.ndarray | None = None) -> EncodedQuery:
        """:meth:`encode` for a decoded image that need not belong to the dataset (no
        query cache; see :meth:`image_words`). ``timings`` (ms): ``extract`` (network),
        ``assign`` (PCA + nearest word), ``vector`` and ``asmk``."""
        timings: dict[str, float] = {"extract": 0.0, "assign": 0.0}
        words, hw = self.image_words(img, image_id, timings)
        eq = self.encode_words(name, image_id, words, hw, bbox, mask, img=img)
        eq.timings = {**timings, **eq.timings}
        if self.scale_encoders:
            eq = self._with_scales(eq, [e.encode_image(img, bbox, name, image_id, mask)
                                        for e in self.scale_encoders], ("extract", "assign"))
        return eq

    def encode_words(self, name: str, image: str | None, words: list[np.ndarray],
                     hw: tuple[int, int], bbox: Box | None, mask: np.ndarray | None = None,
                     img: Image.Image | None = None) -> EncodedQuery:
        """The query vector, cell weights and box cells from the assignment maps of the
        views (what :meth:`encode` and :meth:`encode_image` share). ``image``: the image
        id, ``None`` for an image outside the dataset; ``mask`` replaces the box
        (TRECVid); ``img``: the decoded image, for ASMK signatures of an image that is
        not in the dataset. ``timings``: ``vector`` and ``asmk`` (ms)."""
        t1 = time.perf_counter()
        mode = int(self.s["masking"])
        if mask is None:
            check_box(bbox, hw, name)
        region = bbox is not None or mask is not None
        weights: list[np.ndarray | None] = []
        for v, w in zip(self.variants, words):
            if mode == 0 or not region:
                # the whole photo: plain counts (the paper) or the centre prior the
                # database images carry, so the clutter around the object weighs less
                weights.append(centre_prior(*w.shape)
                               if self.s["query_weighting"] == "centre_prior" else None)
                continue
            if mask is not None:
                mv = transform_mask(mask, v)
                if not mv.any():
                    weights.append(np.zeros(w.shape, np.float32))
                    continue
                weights.append(query_weights(mode, None, hw, w.shape, mask=mv,
                                             query=name))
                continue
            bv = transform_box(bbox, v, hw)
            weights.append(np.zeros(w.shape, np.float32) if bv is None else
                           query_weights(mode, bv, hw, w.shape, query=name))
        cells = None
        if mode != 0 and region:
            bounds = mask_bounds(mask) if mask is not None else bbox
            cells = box_cells(bounds, hw, words[0].shape)
        vec = query_vector(words, weights, self.n_words)
        # an extra scale whose query region holds no word (a box of a cell or two, all
        # dropped by keep_cells) adds nothing; only scale 1 must have words
        if vec[0].size == 0 and self._parent is None:
            raise UserError(f"query '{name}': no query words (box {bbox})")
        t2 = time.perf_counter()
        asmk = None
        if self.s["kernel"] == "asmk":
            # the reference kernel aggregates every feature of the query region; BLCF's
            # weighted kernel takes the cell weights too (centre prior without a box)
            keep = weights[0] if (mode != 0 and region) or \
                self.s["asmk_weighting"] == "bow" else None
            if float(self.s["keep_cells"]) < 1.0:  # the cells step C aggregated: kept ones
                kept = np.asarray(words[0]) != self.n_words
                keep = kept if keep is None else np.where(kept, keep, 0)
            asmk = self.asmk_signature(image, keep, words[0].shape, img=img)
        t3 = time.perf_counter()
        return EncodedQuery(name, name if image is None else image, hw,
                            list(self.variants), words, weights,
                            cells, vec, {"vector": (t2 - t1) * 1000.0,
                                         "asmk": (t3 - t2) * 1000.0}, asmk)

    # ---- ASMK
    def _features(self, image_id: str | None, img: Image.Image | None = None
                  ) -> tuple[np.ndarray, tuple[int, int]]:
        """L2-PCA-L2 local features (H*W, D) of the query image itself and its map size:
        from the database's feature store when the query is a database image (the
        features its signatures were made from), else through the network (``img``: the
        decoded image, for one that is not in the dataset)."""
        if (image_id is not None and self.db_store is not None
                and self._feature_reader() is not None):
            reader = self._feature_reader()
            if image_id in reader.store:
                f, hw = reader.features_and_shape(image_id)
                return np.asarray(f, np.float32), (int(hw[0]), int(hw[1]))
        if img is None:
            assert image_id is not None, "an image outside the dataset comes decoded"
            img = load_image(image_path(self.s, image_id, query=True),
                             int(self.s["max_image_pixels"]))
        maps = combined_maps(self.load_network().extract(img), list(self.s["layers"]),
                             self.s["new_dim"])
        return maps_to_features(maps, bool(self.s["l2norm"]), self.pca), maps.shape[1:]

    def _feature_reader(self) -> LocalFeatureReader | None:
        if self._reader is False:
            path = FeatureStore.path_for(self.s)
            self._reader = None
            if (Path(path) / "data.mdb").is_file():
                nd = self.s["new_dim"]
                self._reader = LocalFeatureReader(FeatureStore(path),
                                                  list(nd) if nd else None,
                                                  l2norm=bool(self.s["l2norm"]), pca=self.pca)
        return self._reader

    def asmk_signature(self, image_id: str | None, weights: np.ndarray | None,
                       map_hw: tuple[int, int], img: Image.Image | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The query's ASMK signatures: its features inside the query region (cells with a
        positive weight in ``weights``; all when it is None) assigned to their ``query_ma`` nearest
        words, residuals summed per word and binarised; with ``asmk_weighting = bow``
        also each word's weight, the sum of the cell weights of the features assigned to
        it (counts without a box), L2-normalised, as the query's BoW vector weighs it."""
        feats, hw = self._features(image_id, img)
        if tuple(hw) != tuple(map_hw):
            raise UserError(f"query '{image_id}': features of a {hw[0]}x{hw[1]} map, but its "
                            f"assignment map is {map_hw[0]}x{map_hw[1]}; rerun step D")
        cell_w = (np.ones(len(feats), np.float64) if weights is None
                  else np.asarray(weights, np.float64).ravel())
        keep = cell_w > 0
        feats, cell_w = feats[keep], cell_w[keep]
        k = int(self.s["query_ma"])
        # exact search: the reference's own (asmk.query_words); approximate: the
        # database's tuned shortlist, k words deep
        words = (self.codebook.nearest(feats, k) if self.codebook.mode == "approximate"
                 else query_words(self._word_index, feats, k))
        uw, sig = aggregate(feats, words, self.codebook.centroids, self.asmk_bits)
        if self.s["asmk_weighting"] != "bow":
            return uw, sig, None
        mass = np.bincount(words.ravel(), np.repeat(cell_w, words.shape[1]),
                           minlength=self.n_words)[uw]
        return uw, sig, mass / max(float(np.linalg.norm(mass)), 1e-12)
