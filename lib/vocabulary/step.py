"""Step B's entry point: fit the PCA-whitening and the visual vocabulary (k-means) on local
features (``bow_pipeline/B_processing_clustering.py`` is its command line).

Inputs: the feature store written by step A (or ``train_store``: another dataset's store,
as the revisited protocol trains on the other city). Reads at most ``max_train_images``
images (a seeded choice) and at most ``n_samples`` local features (all of them when they
fit, else a seeded per-image sample), at the native map size (``train_on = native``, the
original) or upsampled to ``new_dim`` (``train_on = upsampled``).

Work: L2 -> fit PCA-whitening (pca_dim, whiten) -> L2 -> k-means with n_centers words
(``auto``: :func:`lib.vocabulary.sizing.auto_centers` of the sample) (``kmeans``: exact
FAISS Lloyd, on CUDA when present, or approximate: a PQ fast-scan shortlist re-ranked
exactly), at most kmeans_iter iterations (fewer once an iteration improves the objective
by less than kmeans_tol), seed ``seed``. TRAIN_PCA /
TRAIN_CENTROIDS false reuse the existing file in ``path_models`` after checking it
against the settings.

Outputs (``path_models``, default <path_output>/models):
  pca.npz + pca.json            mean, components, variances, whiten flag (no pickle) + metadata
  codebook.npy + codebook.json  n_centers x pca_dim float32 words + metadata
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lib.artefacts import check_fields, library_versions, output_lock
from lib.errors import UserError
from lib.features.local_features import l2n
from lib.pipeline import StepResult
from lib.provenance import (
    CODEBOOK_FIELDS,
    HINT,
    check_codebook,
    check_kmeans_fields,
    check_pca,
    check_provenance,
    expected_provenance,
    models_paths,
    training_fields,
)
from lib.settings import Settings
from lib.vocabulary.codebook import Codebook, train_kmeans
from lib.vocabulary.pca import PCAWhitening
from lib.vocabulary.sizing import auto_centers, resolve_from_codebook, too_many_centers

log = logging.getLogger("blcf.B")
_CHUNK = 65536


def _l2_rows(x: np.ndarray) -> None:
    """In-place row L2 normalisation, chunk by chunk (the sample can fill most of RAM)."""
    for s in range(0, len(x), _CHUNK):
        x[s:s + _CHUNK] = l2n(x[s:s + _CHUNK])


def sample_features(reader: Any, ids: list[str], n_samples: int, max_images: int,
                    seed: int) -> tuple[np.ndarray, list[str]]:
    """The training sample: a seeded choice of at most ``max_images`` images, then all of
    their features when they fit in ``n_samples``, else ``ceil(n_samples / images)``
    random ones per image (each image's draw seeded by (seed, its index), so the sample
    does not depend on reading order), trimmed to ``n_samples`` by a seeded draw."""
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(ids), size=min(max_images, len(ids)), replace=False))
    quota = max(1, math.ceil(n_samples / max(len(chosen), 1)))
    buf: np.ndarray | None = None
    filled = 0
    used: list[str] = []
    for i in tqdm(chosen, desc="B reading training features", unit="img", mininterval=1.0,
                  disable=None, leave=False):
        f = np.asarray(reader.features(ids[i]), np.float32)
        if f.shape[0] > quota:
            pick = np.random.default_rng([seed, int(i)]).choice(f.shape[0], quota, replace=False)
            f = f[np.sort(pick)]
        if buf is None:  # exact for fixed-size maps; grows when sizes vary
            buf = np.empty((len(chosen) * min(quota, max(f.shape[0], 1)), f.shape[1]),
                           np.float32)
        if filled + len(f) > len(buf):
            grown = np.empty((2 * len(buf) + len(f), buf.shape[1]), np.float32)
            grown[:filled] = buf[:filled]
            buf = grown
        buf[filled:filled + len(f)] = f
        filled += len(f)
        used.append(ids[i])
    if buf is None or filled == 0:
        raise UserError("no local features to train on (empty feature store?)")
    x = buf[:filled]
    if filled > n_samples:
        x = x[np.sort(rng.choice(filled, n_samples, replace=False))]
    return x, used


def validate_training(s: Settings) -> None:
    """Every step B setting that can be checked without data, before anything is read or
    written (``kmeans_iter = 0`` used to be refused only after the PCA was saved)."""
    from lib.vocabulary.codebook import MODES

    for key in ("pca_dim", "n_centers", "n_samples", "max_train_images", "kmeans_iter"):
        if s[key] != "auto" and int(s[key]) < 1:
            raise UserError(f"{s.source}: key '{key}': {s[key]} must be >= 1")
    if s.kmeans not in MODES:
        raise UserError(f"{s.source}: key 'kmeans': '{s.kmeans}' is not one of "
                        f"{', '.join(MODES)}")
    if s.TRAIN_CENTROIDS and s.n_centers != "auto" and s.n_centers > s.n_samples:
        raise too_many_centers(s, s.n_samples, "n_samples is")


def _check_sample(s: Settings, x: np.ndarray, pca: PCAWhitening | None,
                  cb: Codebook | None) -> None:
    """The settings against the training sample, before anything is written."""
    n, dim = x.shape
    if pca is None:
        if s.pca_dim > dim:
            raise UserError(f"{s.source}: key 'pca_dim': {s.pca_dim} exceeds the feature "
                            f"dimension ({dim})")
        if n < 2 or s.pca_dim > n:
            raise UserError(f"{s.source}: key 'pca_dim': PCA needs at least pca_dim = "
                            f"{s.pca_dim} and 2 training features, the sample has {n}; "
                            "lower pca_dim or use more images")
    elif pca.dim_in != dim:
        raise UserError(f"{s.path_models}: the PCA expects {pca.dim_in}-D features but the "
                        f"feature store holds {dim}-D ones; {HINT}")
    if cb is None and s.n_centers != "auto" and s.n_centers > n:
        raise too_many_centers(s, n, "the sample has")


def train_models(settings: Settings) -> StepResult:
    """Step B on validated settings: check the models to reuse, sample, fit what is asked
    (under the output lock). Refuses (UserError) before writing anything when the inputs
    do not fit the settings."""
    from lib.features.feature_store import FeatureStore
    from lib.features.local_features import LocalFeatureReader

    s = settings
    t0 = time.perf_counter()
    validate_training(s)
    auto = s.n_centers == "auto"
    if auto and not s.TRAIN_CENTROIDS:  # a reused codebook: the size it was trained with
        s = resolve_from_codebook(s)
    p_pca, p_cb = models_paths(s)
    prov = expected_provenance(s)
    # with "auto" the size is known only once the sample is drawn; the PCA's fields and
    # the checks before sampling do not involve it
    fields = training_fields(s.replace(n_centers=1) if s.n_centers == "auto" else s)
    pca: PCAWhitening | None = None
    cb: Codebook | None = None

    def result(summary: str, **counts: Any) -> StepResult:
        return StepResult("B", summary, (p_pca, p_cb), counts, time.perf_counter() - t0)

    if not s.TRAIN_PCA:
        pca = PCAWhitening.load(p_pca)
        check_pca(pca, p_pca, s.replace(n_centers=1) if s.n_centers == "auto" else s, prov)
    if not s.TRAIN_CENTROIDS:
        cb = Codebook.load(p_cb)
        if pca is not None:
            check_codebook(cb, p_cb, s, prov, pca)
        else:  # the PCA hash can only be checked once the new PCA is fitted
            check_provenance(prov, cb.meta, str(p_cb), HINT)
            check_fields(fields, cb.meta, CODEBOOK_FIELDS, str(p_cb), HINT)
            # refused here, before a PCA is fitted and written on another sample (it
            # would not be the codebook's PCA: another pca_hash)
            check_kmeans_fields(s, cb.meta, str(p_cb), "the codebook was trained with other "
                                "step B settings and would not fit a PCA refitted now "
                                "(pca_hash); " + HINT)
    if pca is not None and cb is not None:
        return result(f"B: nothing to train; reusing {p_pca} and {p_cb} ({cb.k} words)",
                      features=0, images=0, words=cb.k, pca_fitted=False,
                      codebook_fitted=False)

    store_path = Path(s.train_store) if s.train_store else FeatureStore.path_for(s)
    if not Path(store_path).exists():
        key = "train_store" if s.train_store else "path_features"
        raise UserError(f"{store_path}: feature store not found (key '{key}' in "
                        f"{s.source}); run step A first")
    # the settings hash reads train_store's metadata: before this step opens the store
    # (an LMDB environment must not be opened twice in one process)
    settings_hash = s.step_hash("B")
    store = FeatureStore(store_path)
    check_provenance(prov, store.meta, str(store_path),
                     "rerun step A with these settings (or fix train_store)")
    new_dim = list(s.new_dim) if s.train_on == "upsampled" and s.new_dim else None
    reader = LocalFeatureReader(store, new_dim, l2norm=s.l2norm, pca=None)
    ids = store.ids()
    x, used = sample_features(reader, ids, s.n_samples, s.max_train_images, s.seed)
    log.info("training sample: %d features from %d images of %s", len(x), len(used),
             store_path)
    if s.n_centers == "auto":
        s = s.replace(n_centers=auto_centers(len(x)))
        fields = training_fields(s)
        log.info("n_centers auto: %d words for %d training features", s.n_centers, len(x))
    common = {
        "provenance": store.meta.get("provenance", prov), **fields,
        "seed": s.seed, "train_store": str(store_path), "dataset": s.dataset,
        "n_train_images": len(used), "n_train_features": len(x),
        "n_samples": s.n_samples, "max_train_images": s.max_train_images,
        "settings_hash": settings_hash, "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    pca_meta = {k: v for k, v in common.items() if k != "n_centers"}
    _check_sample(s, x, pca, cb)  # refuse before anything is written
    pca_fitted = pca is None
    with output_lock(s.path_output, "B"):
        if pca is None:
            pca = PCAWhitening.fit(x, s.pca_dim, s.whiten)
            pca.save(p_pca, {**pca_meta, **pca.meta})
            log.info("PCA-whitening %d -> %d written to %s", pca.dim_in, pca.dim_out,
                     p_pca)
        if cb is not None:  # reuse the codebook: it must live in this PCA space
            check_codebook(cb, p_cb, s, prov, pca)
            return result(f"B: PCA {p_pca} kept/fitted; codebook {p_cb} reused",
                          features=len(x), images=len(used), words=cb.k,
                          pca_fitted=pca_fitted, codebook_fitted=False)
        if pca.dim_out == x.shape[1]:  # same dimension: in place, chunk by chunk
            y = x
            for st in range(0, len(x), _CHUNK):
                y[st:st + _CHUNK] = pca.transform(x[st:st + _CHUNK])
        else:
            y = pca.transform(x)
        if s.l2norm:
            _l2_rows(y)
        km = train_kmeans(y, s.n_centers, s.kmeans_iter, s.seed, s.kmeans, s.device,
                          tol=s.kmeans_tol)
        cb = Codebook(km.centroids)
        cb.save(p_cb, {**common, "pca_hash": pca.content_hash(), "kmeans": s.kmeans,
                       "n_centers_setting": "auto" if auto else s.n_centers,
                       "kmeans_iter": s.kmeans_iter, "kmeans_tol": s.kmeans_tol,
                       "kmeans_iterations_run": km.niter, "kmeans_stop": km.stop,
                       "kmeans_objective": km.objective,
                       "kmeans_seconds": km.seconds, "kmeans_device": km.device})
    return result(f"B: {len(x)} features from {len(used)} images -> PCA {pca.dim_in}->"
                  f"{pca.dim_out} + {cb.k} words{' (auto)' if auto else ''}, {km.niter} "
                  f"k-means iterations ({km.stop}) in {time.perf_counter() - t0:.1f} s",
                  features=len(x), images=len(used), words=cb.k, pca_fitted=pca_fitted,
                  codebook_fitted=True, kmeans_iterations=km.niter, kmeans_stop=km.stop)
