"""How many training features step B will sample, and the codebook size that fits them.

Why before step B: a vocabulary larger than its training sample cannot be trained, and
finding that out after step A has spent minutes or hours extracting features wastes them.
The sample size follows from the settings alone for fixed-size maps: every image gives
``ceil(H / stride) * ceil(W / stride)`` native cells (``train_on = native``) or the
``new_dim`` cells (``upsampled``), and :func:`lib.vocabulary.step.sample_features` takes
at most ``max_train_images`` images, at most ``ceil(n_samples / images)`` features of
each and at most ``n_samples`` in all. Unreadable images only lower the real count, so
the estimate is an upper bound: a refusal based on it is never wrong.

``n_centers = "auto"`` is :data:`AUTO_FRACTION` of the training features, at most
:data:`AUTO_MAX` (the paper's vocabulary for Oxford5k), at least one word.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib.errors import ArtefactMismatchError, SettingsError, UserError

AUTO_FRACTION = 10  # one word per this many training features
AUTO_MAX = 25000

# stride of each tappable layer (the first layer sets the map size the reader uses)
_STRIDES = {
    "efficientnet": {"s6_expand": 16, "head": 32},
    "resnet": {"layer3": 16, "layer4": 32},
}


def auto_centers(n_features: int) -> int:
    """The ``"auto"`` vocabulary size for ``n_features`` training features."""
    return max(1, min(AUTO_MAX, int(n_features) // AUTO_FRACTION))


def layer_stride(network: str, layer: str) -> int | None:
    """The stride of ``layer`` in ``network``, or None when this table does not know it."""
    if network == "vgg16":
        if layer == "pool5_ceil":
            return 32
        if len(layer) >= 5 and layer[:4] in ("conv", "pool") and layer[4].isdigit():
            block = int(layer[4])
            return 2 ** (block if layer.startswith("pool") else block - 1)
        return None
    family = "efficientnet" if network.startswith("efficientnet") else (
        "resnet" if network.startswith("resnet") else "")
    return _STRIDES.get(family, {}).get(layer)


def features_per_image(s: Mapping[str, Any]) -> int | None:
    """Local features one database image gives step B's sample, or None when it depends
    on the image (``resize`` other than fixed with native maps) or the layer is unknown."""
    if s["train_on"] == "upsampled" and s["new_dim"]:
        return int(s["new_dim"][0]) * int(s["new_dim"][1])
    if s["resize"] != "fixed":
        return None
    stride = layer_stride(s["network"], s["layers"][0])
    if stride is None:
        return None
    h, w = s["input_size"]
    return math.ceil(h / stride) * math.ceil(w / stride)


def estimate_training_features(s: Mapping[str, Any], n_images: int) -> int | None:
    """Upper bound on the training sample step B draws from a store of ``n_images``
    images (module docstring); None when it cannot be known before step A."""
    per = features_per_image(s)
    if per is None or s["train_store"]:
        return None
    chosen = min(int(s["max_train_images"]), int(n_images))
    if chosen == 0:
        return 0
    quota = max(1, math.ceil(int(s["n_samples"]) / chosen))
    return min(int(s["n_samples"]), chosen * min(per, quota))


def too_many_centers(s: Mapping[str, Any], n_features: int, how: str) -> SettingsError:
    """The refusal for ``n_centers`` above ``n_features``, with the largest valid value
    and what ``auto`` would give; ``how`` says where the count comes from."""
    return SettingsError(
        f"{getattr(s, 'source', 'settings')}: key 'n_centers': "
        f"{s['n_centers']} words need at least as many training features, but {how} "
        f"{n_features}; use n_centers <= {n_features}, or \"auto\" "
        f"({auto_centers(n_features)} here)")


def check_codebook_size(s: Mapping[str, Any], n_images: int) -> int | None:
    """Refuse (SettingsError) an integer ``n_centers`` that the training sample of
    ``n_images`` images cannot reach, before any image is read; returns the estimate.
    Nothing is checked when step B does not train a codebook or the estimate is unknown."""
    n = estimate_training_features(s, n_images)
    k = s["n_centers"]
    if n is None or k == "auto" or not s["TRAIN_CENTROIDS"] or int(k) <= n:
        return n
    per = features_per_image(s)
    raise too_many_centers(s, n, f"{min(int(s['max_train_images']), n_images)} images of "
                           f"{per} features (n_samples {s['n_samples']}) give at most")


def resolve_from_codebook(s: Any) -> Any:
    """``s`` with ``n_centers = "auto"`` replaced by the size step B chose, read from
    ``<path_models>/codebook.json`` (which records ``n_centers_setting: "auto"``), so
    that the steps after B compare their models with a number. Raises UserError when
    there is no codebook or it was trained with a fixed size."""
    if s["n_centers"] != "auto":
        return s
    path = Path(s["path_models"]) / "codebook.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}: no readable codebook metadata to resolve n_centers = "
                        "\"auto\"; run step B first") from None
    k = meta.get("n_centers") if isinstance(meta, dict) else None
    if not isinstance(k, int) or isinstance(k, bool) or meta.get("n_centers_setting") != "auto":
        raise ArtefactMismatchError(
            f"{path}: field 'n_centers' is {k} (a fixed size) but the settings ask for "
            "\"auto\"; rerun step B with these settings")
    return s.replace(n_centers=k)
