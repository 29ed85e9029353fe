"""One finished run (models from step B, index from step C) loaded once, answering
``search(image, box, top)`` for photos that need not belong to the dataset.

Why a service object: the command line (``bow_pipeline/search.py``) and the web page
(``bow_pipeline/serve.py``) must encode and rank a photo exactly as step D ranks a query,
so both go through :func:`lib.search.step.open_bow` (the same artefact checks) and
:meth:`QueryEncoder.encode_image` + :meth:`BowSearcher.rank` (the same masking,
augmentation, re-ranking and query expansion); the web server keeps one instance for
its lifetime instead of loading the network and mapping the index per request.

Concurrency (the web server answers each request in its own thread): the searches run
in parallel, without a lock. What they share is read-only once :meth:`warm_up` has built
the lazily made pieces (the network, the codebook's FAISS index, scipy's kernels): the
network's forward pass keeps its tapped maps in local variables under
``torch.inference_mode``; FAISS searches and the inverted file's scoring allocate per
call; every LMDB read opens and closes its own read transaction in the calling thread
(the read-only store has no writer, so LMDB needs no lock). Two things are locked:
decoding (:data:`DECODE_LOCK`: ``lib.features.images.load_image`` swaps Pillow's
process-wide ``MAX_IMAGE_PIXELS`` while it opens a file) and nothing else;
``max_concurrent`` bounds how many searches run at once (memory), the others wait.
The query cache (``query_words.lmdb``) is neither read nor written: step D owns it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lib.errors import UserError
from lib.features.feature_store import FeatureStore
from lib.features.images import CorruptImageError, load_image
from lib.groundtruth.common import IMAGE_EXTENSIONS
from lib.groundtruth.loader import image_path, load_ground_truth
from lib.index.assignment_store import AssignmentStore
from lib.provenance import models_paths
from lib.search.masks import check_box
from lib.search.step import BowParts, open_bow

log = logging.getLogger(__name__)

# lib.features.images.load_image sets Pillow's process-wide MAX_IMAGE_PIXELS while it
# opens a file and restores it after: two threads interleaving would leave it changed
DECODE_LOCK = threading.Lock()

Box = tuple[float, float, float, float]

STEP_SCRIPTS = {"A": "A_feature_extraction.py", "B": "B_processing_clustering.py",
                "C": "C_bow_representation.py"}


class RunNotReadyError(UserError):
    """The run has not reached step C: search needs the models and the index."""


def check_run_ready(settings: Any) -> None:
    """Refuse a run without step C's output, naming the first step still to run."""
    out = Path(settings["path_output"])
    name = Path(getattr(settings, "source", "SETTINGS")).name
    index, assignments = out / "index", AssignmentStore.path_for(settings)
    if (index / "meta.json").is_file() and (assignments / "data.mdb").is_file():
        return
    step = "C"
    if not all(p.is_file() for p in models_paths(settings)):
        step = "B" if (Path(FeatureStore.path_for(settings)) / "data.mdb").is_file() else "A"
    missing = index if step == "C" else Path(settings["path_models"])
    raise RunNotReadyError(f"{out}: this run has not reached step C ({missing} is missing); "
                           f"run step {step} first: bow_pipeline/{STEP_SCRIPTS[step]} {name} "
                           f"(or bow_pipeline/run_all.py {name})")


def decode_file(path: Path, max_pixels: int, name: str | None = None) -> Image.Image:
    """A photo decoded as every step decodes images (EXIF orientation, modes, the
    decompression-bomb guard ``max_pixels``); errors name ``name`` (default the path)."""
    try:
        with DECODE_LOCK:
            return load_image(Path(path), int(max_pixels))
    except CorruptImageError as e:
        if name is None:
            raise
        raise CorruptImageError(str(e).replace(str(path), name, 1)) from None


def decode_bytes(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """An uploaded photo: :func:`decode_file` on a private temporary copy (the shared
    decoder reads files), errors naming the upload."""
    if not data:
        raise CorruptImageError(f"{name}: empty file")
    fd, tmp = tempfile.mkstemp(prefix="blcf-upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return decode_file(Path(tmp), max_pixels, name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def parse_box(values: Sequence[Any] | str | None) -> Box | None:
    """``[x1, y1, x2, y2]`` (or ``"x1,y1,x2,y2"``) of finite numbers, or None."""
    if values is None or (isinstance(values, str) and not values.strip()):
        return None
    parts = values.replace(",", " ").split() if isinstance(values, str) else list(values)
    try:
        box = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        raise UserError(f"box {values!r}: expected four numbers x1 y1 x2 y2") from None
    if len(box) != 4 or not all(np.isfinite(box)):
        raise UserError(f"box {values!r}: expected four finite numbers x1 y1 x2 y2")
    return box  # type: ignore[return-value]


@dataclass
class SearchResult:
    """One query's answer: the ``top`` best database images (best first) with the
    score that orders step D's list, and with re-ranking the object's box in the
    result (original pixels) and its window score; times per stage in ms."""

    query: str
    image_size: tuple[int, int]  # (width, height) after EXIF orientation
    box: Box | None
    results: list[dict[str, Any]]
    timings_ms: dict[str, float]
    n_db: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_text(self) -> str:
        """The command line's answer: a header, then one line per result."""
        w, h = self.image_size
        box = "whole image" if self.box is None else \
            "box [" + ", ".join(f"{c:g}" for c in self.box) + "]"
        t = self.timings_ms
        stages = ", ".join(f"{k} {t[k]:.0f}" for k in
                           ("decode", "extract", "assign", "search", "rerank", "qe")
                           if t.get(k, 0.0) >= 0.5)
        lines = [f"{self.query} ({w}x{h}, {box}): top {len(self.results)} of {self.n_db} "
                 f"images in {t['total']:.0f} ms ({stages})"]
        for r in self.results:
            loc = "" if r["box"] is None else \
                "  box [" + ", ".join(f"{c:.0f}" for c in r["box"]) + "]"
            lines.append(f"{r['rank']:4d}  {r['score']:9.4f}  {r['image_id']}{loc}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"query": self.query, "image_size": list(self.image_size),
                "box": None if self.box is None else [float(c) for c in self.box],
                "n_db": self.n_db, "results": self.results,
                "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
                **self.extra}


class QueryService:
    """A finished run opened once for many searches (see the module's notes on threads).

    ``max_pixels``: decoding guard (default the settings' ``max_image_pixels``);
    ``max_concurrent``: searches running at once (None: no bound)."""

    def __init__(self, settings: Any, max_pixels: int | None = None,
                 max_concurrent: int | None = None, warm: bool = True) -> None:
        check_run_ready(settings)
        self.settings = settings
        self.max_pixels = int(max_pixels or settings["max_image_pixels"])
        self.bow: BowParts = open_bow(settings)
        self.db_ids: list[str] = list(self.bow.index.image_ids)
        self._db_set = frozenset(self.db_ids)
        self._slots = threading.BoundedSemaphore(max_concurrent) if max_concurrent else None
        self._gt: Any = None
        self._gt_lock = threading.Lock()
        if warm:
            self.warm_up()

    # ---- life cycle
    def warm_up(self) -> None:
        """Build what is made on first use (network, FAISS index, scipy kernels) before
        threads share it, with one search of a small synthetic photo."""
        self.bow.encoder.load_network()
        rng = np.random.default_rng(0)
        img = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
        try:
            self.search(img, None, 1, name="warm-up")
        except UserError as e:  # e.g. a photo with no words: still warm enough
            log.debug("warm-up search: %s", e)

    def close(self) -> None:
        self.bow.close()

    def __enter__(self) -> QueryService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- properties of the run
    @property
    def n_db(self) -> int:
        return len(self.db_ids)

    def has_image(self, image_id: str) -> bool:
        return image_id in self._db_set

    def database_image(self, image_id: str) -> Path:
        """File of a database image that the index holds (UserError otherwise)."""
        if image_id not in self._db_set:
            raise UserError(f"image '{image_id}' is not in this run's index")
        return image_path(self.settings, image_id)

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(width, height) of a database image as stored by step C (after EXIF)."""
        _, hw = self.bow.db_store.get(image_id)
        return int(hw[1]), int(hw[0])

    def database_id_of(self, path: Path) -> str | None:
        """The database id of a photo file inside the image root when the queries share
        that root (step D then takes its unaugmented map from the database store), else
        None."""
        s = self.settings
        if s["path_queries"] not in (None, s["path_images"]):
            return None
        try:
            rel = Path(path).resolve().relative_to(Path(s["path_images"]).resolve())
        except ValueError:
            return None
        if rel.suffix.lower() not in IMAGE_EXTENSIONS:
            return None
        image_id = rel.with_suffix("").as_posix()
        return image_id if image_id in self._db_set else None

    def ground_truth(self) -> Any:
        """The dataset's ground truth (loaded on first use: the page's query browser)."""
        with self._gt_lock:
            if self._gt is None:
                self._gt = load_ground_truth(self.settings)
            return self._gt

    # ---- searching
    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self._slots is None:
            yield
            return
        with self._slots:
            yield

    def _rank(self, img: Image.Image, box: Box | None, name: str, image_id: str | None,
              mask: np.ndarray | None = None) -> tuple[Any, dict[str, float], float]:
        """Encode and rank (step D's code): the ranking, its stage times (ms) and the
        time spent waiting for a slot (ms)."""
        t0 = time.perf_counter()
        with self._slot():
            wait = (time.perf_counter() - t0) * 1000.0
            eq = self.bow.encoder.encode_image(img, box, name, image_id=image_id, mask=mask)
            ranked = self.bow.searcher.rank(eq)
        t = {**eq.timings, **ranked.timings}
        stages = {"extract": t.get("extract", 0.0), "assign": t.get("assign", 0.0),
                  "vector": t.get("vector", 0.0) + t.get("asmk", 0.0),
                  "search": t["search"], "rerank": t["rerank"], "qe": t["qe"]}
        return ranked, stages, wait

    def _answer(self, ranked: Any, top: int, name: str, img: Image.Image,
                box: Box | None, stages: dict[str, float], wait: float, decode_ms: float,
                t0: float) -> SearchResult:
        top = max(1, min(int(top), self.n_db))
        locs = {d["image"]: d for d in ranked.localisations or []}
        results = []
        for rank, i in enumerate(ranked.order[:top].tolist()):
            iid = self.db_ids[i]
            loc = locs.get(iid)
            w, h = self.image_size(iid)
            results.append({"rank": rank + 1, "image_id": iid,
                            "score": round(float(ranked.scores[i]), 6),
                            "box": None if loc is None else loc["box"],
                            "window_score": None if loc is None else round(loc["score"], 6),
                            "width": w, "height": h})
        timings = {"decode": decode_ms, **stages, "wait": wait,
                   "total": decode_ms + (time.perf_counter() - t0) * 1000.0}
        return SearchResult(name, (int(img.size[0]), int(img.size[1])), box, results,
                            timings, self.n_db)

    def search(self, img: Image.Image, box: Box | None = None, top: int = 10,
               name: str = "query", image_id: str | None = None,
               decode_ms: float = 0.0) -> SearchResult:
        """Rank the database for a decoded photo as step D ranks a query: the settings'
        masking (with ``box``), augmentation, kernel, re-ranking and query expansion.
        ``image_id``: the photo is this database image (see :meth:`database_id_of`).
        Timings (ms): decode (``decode_ms``, done by the caller), extract (network),
        assign (PCA + nearest word), vector (query vector), search (inverted file),
        rerank, qe, wait (for a slot), total."""
        t0 = time.perf_counter()
        check_box(box, (int(img.size[1]), int(img.size[0])), name)  # before the network
        ranked, stages, wait = self._rank(img, box, name, image_id)
        return self._answer(ranked, top, name, img, box, stages, wait, decode_ms, t0)

    def search_file(self, path: Path, box: Box | None = None, top: int = 10) -> SearchResult:
        """:meth:`search` of a photo file (named by its path in errors)."""
        t0 = time.perf_counter()
        img = decode_file(Path(path), self.max_pixels, str(path))
        ms = (time.perf_counter() - t0) * 1000.0
        return self.search(img, box, top, name=str(path), image_id=self.database_id_of(path),
                           decode_ms=ms)

    def search_files(self, paths: Sequence[Path], box: Box | None = None,
                     top: int = 10) -> list[SearchResult]:
        """:meth:`search_file` of several photos, every one decoded and its box checked
        before the first search, so a bad photo fails at once."""
        decoded = []
        for path in paths:
            t0 = time.perf_counter()
            img = decode_file(Path(path), self.max_pixels, str(path))
            check_box(box, (int(img.size[1]), int(img.size[0])), str(path))
            decoded.append((path, img, (time.perf_counter() - t0) * 1000.0))
        return [self.search(img, box, top, name=str(path),
                            image_id=self.database_id_of(path), decode_ms=ms)
                for path, img, ms in decoded]

    def search_bytes(self, data: bytes, name: str, box: Box | None = None,
                     top: int = 10) -> SearchResult:
        """:meth:`search` of an uploaded photo (bytes), named ``name`` in errors."""
        t0 = time.perf_counter()
        img = decode_bytes(data, name, self.max_pixels)
        ms = (time.perf_counter() - t0) * 1000.0
        return self.search(img, box, top, name=name, decode_ms=ms)

    def query_image(self, index: int) -> tuple[Any, Path]:
        """The dataset's query ``index`` and its photo file."""
        gt = self.ground_truth()
        if not 0 <= int(index) < len(gt.queries):
            raise UserError(f"query {index}: the dataset has {len(gt.queries)} queries")
        q = gt.queries[int(index)]
        return q, image_path(self.settings, q.image, query=True)

    def search_dataset_query(self, index: int, top: int = 10) -> SearchResult:
        """One of the dataset's own queries ranked as step D ranks it (its box, or its
        mask image as D uses it), each result judged ``positive``/``negative``/``junk``,
        and the query's AP over the whole ranking (the Oxford rule, as step E)."""
        from lib.evaluation.metrics import average_precision
        from lib.search.query_encoding import load_mask

        q, path = self.query_image(index)
        t0 = time.perf_counter()
        img = decode_file(path, self.max_pixels, q.image)
        decode_ms = (time.perf_counter() - t0) * 1000.0
        s = self.settings
        same_root = s["path_queries"] in (None, s["path_images"])
        image_id = q.image if same_root and q.image in self._db_set else None
        hw = (int(img.size[1]), int(img.size[0]))
        mask = load_mask(q.mask, hw, q.name) if q.mask is not None else None
        if mask is None:
            check_box(q.bbox, hw, q.name)
        ranked, stages, wait = self._rank(img, q.bbox, q.name, image_id, mask)
        res = self._answer(ranked, top, q.name, img, q.bbox, stages, wait, decode_ms, t0)
        for r in res.results:
            iid = r["image_id"]
            r["label"] = ("positive" if iid in q.positives else "junk" if iid in q.junk
                          else "negative")
        ap = average_precision([self.db_ids[i] for i in ranked.order.tolist()],
                               q.positives, q.junk)
        res.extra = {"dataset_query": {"index": int(index), "name": q.name, "image": q.image,
                                       "n_positives": len(q.positives),
                                       "ap": None if np.isnan(ap) else round(float(ap), 4)}}
        return res
