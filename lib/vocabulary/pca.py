"""PCA-whitening of local features (step B fits it, steps C and D apply it).

Why not sklearn's pickled ``PCA``: the original pickled the whole estimator, which ties
the artefact to one sklearn version and is unsafe to load. Here the model is four plain
arrays in a ``.npz`` (mean, components, variances, whiten flag) plus a JSON sidecar with
its provenance. The fit reproduces ``sklearn.decomposition.PCA(n, whiten=True)``: centre,
take the principal axes of the covariance, divide each projection by the square root of
its (unbiased) variance. It accumulates the covariance in float64 chunk by chunk, so
millions of 512-D features fit in bounded extra memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from lib.artefacts import atomic_path, read_json, sidecar, write_json_atomic
from lib.errors import UserError

log = logging.getLogger(__name__)

_CHUNK = 65536  # rows per float64 block while accumulating moments
# whitening divides by sqrt(variance); components with a variance below this fraction
# of the largest (dead ReLU channels) are floored to it: dividing by ~0 would blow float32
# rounding noise up to the size of real components (sklearn does divide; this is the one
# place where we differ from it, and only for such degenerate components)
_VAR_FLOOR = 1e-6


class PCAWhitening:
    """A fitted PCA(-whitening): ``y = (x - mean) @ components.T / sqrt(variances)``."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, variances: np.ndarray,
                 whiten: bool = True, meta: dict[str, Any] | None = None) -> None:
        self.mean = np.ascontiguousarray(mean, np.float64)
        self.components = np.ascontiguousarray(components, np.float64)
        self.variances = np.ascontiguousarray(variances, np.float64)
        self.whiten = bool(whiten)
        self.meta: dict[str, Any] = dict(meta or {})
        d, D = self.components.shape
        if self.mean.shape != (D,) or self.variances.shape != (d,):
            raise ValueError(f"inconsistent PCA shapes: mean {self.mean.shape}, components "
                             f"{self.components.shape}, variances {self.variances.shape}")
        # transform as one float32 GEMM plus a bias: x @ W - mean @ W
        scale = 1.0 / np.sqrt(self._floored_variances()) if self.whiten else np.ones(d)
        w = self.components.T * scale[None, :]
        self._w = np.ascontiguousarray(w, np.float32)
        self._b = (self.mean @ w).astype(np.float32)

    @property
    def dim_in(self) -> int:
        return int(self.components.shape[1])

    @property
    def dim_out(self) -> int:
        return int(self.components.shape[0])

    def _floored_variances(self) -> np.ndarray:
        v = self.variances
        floor = max(float(v.max(initial=0.0)), 1e-30) * _VAR_FLOOR
        return np.maximum(v, floor)

    # ------------------------------------------------------------------ fit

    @classmethod
    def fit(cls, x: np.ndarray, dim: int, whiten: bool = True) -> PCAWhitening:
        """Fit on the rows of ``x`` (n, D). Matches sklearn ``PCA(dim, whiten=whiten)``
        up to float rounding, with the same sign convention (the largest-magnitude
        coordinate of each component is positive)."""
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D array of features, got shape {x.shape}")
        n, D = x.shape
        if not 1 <= dim <= D:
            raise UserError(f"pca_dim = {dim} must lie in [1, {D}] (the feature dimension)")
        if n < 2 or dim > n:
            raise UserError(f"PCA needs at least pca_dim = {dim} and 2 training features, "
                            f"got {n}; lower pca_dim or use more images")
        mean = np.zeros(D, np.float64)
        for s in range(0, n, _CHUNK):
            mean += x[s:s + _CHUNK].sum(axis=0, dtype=np.float64)
        mean /= n
        cov = np.zeros((D, D), np.float64)
        # one BLAS/LAPACK thread: multi-threaded reductions round differently with the
        # thread count, which made two runs with the same seed differ in the last bits
        # (and so in every hash downstream); the cost is a few seconds at 2M x 512
        with threadpool_limits(limits=1):
            for s in range(0, n, _CHUNK):
                c = x[s:s + _CHUNK].astype(np.float64) - mean
                cov += c.T @ c
            cov /= n - 1
            vals, vecs = np.linalg.eigh(cov)  # ascending
        order = np.argsort(vals)[::-1][:dim]
        variances = np.maximum(vals[order], 0.0)
        comps = vecs[:, order].T.copy()
        # deterministic signs, as sklearn's svd_flip on the components
        big = np.argmax(np.abs(comps), axis=1)
        comps *= np.sign(comps[np.arange(dim), big])[:, None]
        n_tiny = int((variances <= variances[0] * _VAR_FLOOR).sum()) if dim else 0
        if whiten and n_tiny:
            log.warning("PCA: %d of %d components have ~zero variance; their whitening "
                        "scale is capped", n_tiny, dim)
        meta = {"n_fit": int(n), "dim_in": int(D), "pca_dim": int(dim), "whiten": bool(whiten),
                "explained_variance_ratio": float(variances.sum() / max(np.trace(cov), 1e-30))}
        return cls(mean, comps, variances, whiten, meta)

    # ------------------------------------------------------------------ apply

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project (and whiten) the rows of ``x`` (n, D) -> (n, d) float32."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise UserError(f"PCA expects {self.dim_in}-D features, got shape {x.shape} "
                            "(model trained on another layer set?)")
        y = np.asarray(x, np.float32) @ self._w
        y -= self._b
        return y

    # ------------------------------------------------------------------ I/O

    def content_hash(self) -> str:
        """Hash of the arrays (not the file bytes): what later artefacts record."""
        h = hashlib.sha256()
        for a in (self.mean, self.components, self.variances):
            h.update(np.ascontiguousarray(a, "<f8").tobytes())
        h.update(b"w1" if self.whiten else b"w0")
        return h.hexdigest()[:16]

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """``path`` (.npz, no pickles) + ``<stem>.json``; each written atomically, the
        sidecar last so a crash never leaves metadata describing a missing model. The
        sidecar records the content hash and :meth:`load` checks it: a kill between the
        two renames (new model, the previous sidecar) is refused on load, never used."""
        path = Path(path)
        self.meta = {**meta, "pca_hash": self.content_hash(), "pca_dim": self.dim_out,
                     "dim_in": self.dim_in, "whiten": self.whiten}
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mean=self.mean, components=self.components,
                     variances=self.variances, whiten=np.array(self.whiten))
            f.flush()
            os.fsync(f.fileno())
        write_json_atomic(sidecar(path), self.meta)

    @classmethod
    def load(cls, path: Path) -> PCAWhitening:
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: PCA model not found (run step B with TRAIN_PCA true)")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("mean", "components", "variances", "whiten")}
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise UserError(f"{path}: unreadable PCA model ({e})") from None
        meta = read_json(sidecar(path), "PCA metadata")
        hint = "rerun step B with TRAIN_PCA true"
        if not isinstance(meta, dict):
            raise UserError(f"{sidecar(path)}: PCA metadata is not a JSON object; {hint}")
        for k in ("mean", "components", "variances"):
            a = arrays[k]
            if a.dtype.kind != "f" or not np.isfinite(a).all():
                raise UserError(f"{path}: '{k}' is not a finite float array ({a.dtype}); "
                                f"{hint}")
        try:
            pca = cls(arrays["mean"], arrays["components"], arrays["variances"],
                      bool(arrays["whiten"]), meta)
        except ValueError as e:
            raise UserError(f"{path}: {e}; {hint}") from None
        rec = (meta.get("pca_dim"), meta.get("dim_in"))
        if any(r is not None and r != n for r, n in zip(rec, (pca.dim_out, pca.dim_in),
                                                         strict=True)):
            raise UserError(f"{path}: a {pca.dim_in} -> {pca.dim_out} PCA but its metadata "
                            f"{sidecar(path).name} records {rec[1]} -> {rec[0]} (another "
                            f"run's or an interrupted write?); {hint}")
        recorded = meta.get("pca_hash")
        if recorded is None:
            raise UserError(f"{sidecar(path)}: no 'pca_hash' in the PCA metadata; {hint}")
        if recorded != pca.content_hash():
            raise UserError(f"{path}: the model does not match the 'pca_hash' recorded in "
                            f"{sidecar(path).name} (another run's, edited, or an interrupted "
                            f"write); {hint}")
        return pca
