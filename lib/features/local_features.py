"""The reader of local features (the original's ``Local_Feature_ReaderDB``), without its
multi-layer bugs (spec §7): one orientation decision per image (from the stored map
itself), every layer resized to the first layer's map before concatenation along C, and
pooling over all concatenated layers.

Geometry: maps are (C, H, W); ``new_dim`` is given in portrait order (42×32) and is
transposed for landscape maps (any map not taller than wide, the images' rule); the ×2
upsampling is bilinear with aligned corners (scipy ``zoom`` order 1 in the original).
Local features are the map's cells flattened row-major: row ``r*W + c``.
Post-processing: L2 -> PCA(-whitening) -> L2 (each optional).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lib.errors import UserError
from lib.features.feature_store import FeatureStore
from lib.features.images import is_portrait, oriented

POOLINGS = ("sum", "max", "gem")


def l2n(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """L2-normalise along ``axis``; all-zero vectors stay zero (no NaN)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=axis, keepdims=True))
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def upsample(maps: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """(C, h, w) -> (C, H, W) bilinear with aligned corners (the original's ``zoom``)."""
    maps = np.asarray(maps, dtype=np.float32)
    size = (int(size_hw[0]), int(size_hw[1]))
    if maps.shape[1:] == size:
        return maps
    t = torch.from_numpy(np.ascontiguousarray(maps))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=True)[0].numpy()


def _transform(x: np.ndarray, l2norm: bool, pca: Any) -> np.ndarray:
    if l2norm:
        x = l2n(x)
    if pca is not None:
        x = np.asarray(pca.transform(x), dtype=np.float32)
        if l2norm:
            x = l2n(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def maps_to_features(maps: np.ndarray, l2norm: bool = True, pca: Any = None) -> np.ndarray:
    """(C, H, W) -> (H*W, C') float32: row ``r*W + c`` is cell (r, c); then L2 -> PCA
    -> L2 (``pca``: any object with ``.transform(X)``)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"expected maps of shape (C, H, W), got {maps.shape}")
    c = maps.shape[0]
    return _transform(maps.reshape(c, -1).T, l2norm, pca)


def pool_maps(maps: np.ndarray, method: str = "sum", p: float = 3.0) -> np.ndarray:
    """(C, H, W) -> (C,) float32 by sum, max or GeM (generalised mean, exponent ``p``,
    on the non-negative part)."""
    x = np.asarray(maps, dtype=np.float32).reshape(maps.shape[0], -1)
    if method == "sum":
        return x.sum(axis=1, dtype=np.float64).astype(np.float32)
    if method == "max":
        return x.max(axis=1)
    if method == "gem":
        m = np.mean(np.power(np.clip(x, 1e-6, None, dtype=np.float64), p), axis=1)
        return np.power(m, 1.0 / p).astype(np.float32)
    raise UserError(f"pooling {method!r}: expected one of {', '.join(POOLINGS)}")


class LocalFeatureReader:
    """Maps and local features of a :class:`FeatureStore`.

    ``new_dim``: portrait (H, W) the maps are upsampled to (oriented like each map), or
    None for the native size. ``layers``: which stored layers to read (default all, in
    store order); they are concatenated along C after resizing each (bilinear, aligned
    corners) to the first layer's map size."""

    def __init__(self, store: FeatureStore, new_dim: Sequence[int] | None,
                 l2norm: bool = True, pca: Any = None,
                 layers: Sequence[str] | None = None) -> None:
        self.store = store
        self.new_dim = None if new_dim is None else (int(new_dim[0]), int(new_dim[1]))
        if self.new_dim is not None and self.new_dim[0] < self.new_dim[1]:
            raise UserError(f"new_dim {list(self.new_dim)}: give it in portrait order "
                            "(H >= W)")
        self.l2norm = l2norm
        self.pca = pca
        stored = store.layers
        self.layers = list(layers) if layers is not None else stored
        for ly in self.layers:
            if ly not in stored:
                raise UserError(f"{store.path}: layer '{ly}' not stored (stored: "
                                f"{', '.join(stored)})")

    def maps(self, image_id: str) -> np.ndarray:
        """(C, H, W) float32: the layers concatenated, upsampled to ``new_dim``."""
        stored, _ = self.store.get(image_id)
        first = stored[self.layers[0]]
        h, w = first.shape[1:]
        parts = [first] + [upsample(stored[ly], (h, w)) for ly in self.layers[1:]]
        maps = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if self.new_dim is not None:
            # one orientation decision per image, from its own (first-layer) map
            maps = upsample(maps, oriented(self.new_dim, is_portrait(w, h)))
        return maps

    def features_and_shape(self, image_id: str) -> tuple[np.ndarray, tuple[int, int]]:
        """((H*W, D) features, (H, W) of the map they come from)."""
        f, hw, _ = self.features_shape_strength(image_id, strength=False)
        return f, hw

    def features_shape_strength(self, image_id: str, strength: bool = True
                                ) -> tuple[np.ndarray, tuple[int, int], np.ndarray | None]:
        """:meth:`features_and_shape` and, with ``strength``, each cell's activation
        strength (H, W) (:func:`lib.index.encoding.cell_strength`, for ``keep_cells``)
        from the same maps."""
        from lib.index.encoding import cell_strength

        m = self.maps(image_id)
        hw = (int(m.shape[1]), int(m.shape[2]))
        return (maps_to_features(m, self.l2norm, self.pca), hw,
                cell_strength(m) if strength else None)

    def features(self, image_id: str, n_samples: int | None = None,
                 rng: np.random.Generator | None = None) -> np.ndarray:
        """(N, D) local features; with ``n_samples``, a random subset of that many rows
        without replacement (in their original order), drawn from ``rng`` (seed 0 when
        not given, so the result is reproducible)."""
        f, _ = self.features_and_shape(image_id)
        if n_samples is not None and n_samples < len(f):
            rng = rng if rng is not None else np.random.default_rng(0)
            keep = np.sort(rng.choice(len(f), size=int(n_samples), replace=False))
            f = f[keep]
        return f

    def pool(self, image_id: str, method: str = "sum", p: float = 3.0) -> np.ndarray:
        """(D,) pooled vector over the whole (concatenated) map, then L2 -> PCA -> L2."""
        v = pool_maps(self.maps(image_id), method, p)
        return _transform(v[None], self.l2norm, self.pca)[0]
