"""Multi-scale extraction (the ``scales`` setting): the settings of each scale, where its
artefacts live, and how its words join the image's vector.

Why a module of its own: steps A, C and D and the query service must agree on every
one of these rules, and a scale's artefacts are the ordinary ones (a feature store, an
assignment store, a query cache) made with scaled settings, so the rules are all there
is to multi-scale. Scale 1 is the run itself: the map step B trains on and the one
re-ranking, localisation and the expansions' windows use. Every other scale ``s`` sees
the image at ``s`` times ``input_size`` (or ``max_side``), upsamples its maps to ``s``
times ``new_dim``, and is assigned with the same PCA and codebook.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lib.index.bow import SparseVec, l2_normalise, sparse_sum
from lib.index.encoding import database_vector
from lib.settings import scaled_sizes


def extra_scales(settings: Any) -> list[float]:
    """The scales after the first (which is always 1)."""
    return [float(x) for x in settings["scales"][1:]]


def at_scale(settings: Any, scale: float) -> Any:
    """The settings of one scale: those of :func:`lib.settings.scaled_sizes` (the input
    size, the maps' size and, with ``resize = max_side``, the longer side, times
    ``scale``), one scale. Its feature store, assignment maps and provenance follow from
    these like any run's. The settings' cross-checks have made sure that every scale
    gives valid, distinct sizes."""
    return settings.replace(scales=[1.0], **scaled_sizes(settings, scale))


def tag(scale: float) -> str:
    """The name part of a scale's artefacts: ``x0.5``, ``x0.7071``."""
    return f"x{scale:.4g}"


def assignment_path(settings: Any, scale: float) -> Path:
    """Step C's assignment store of an extra scale: ``assignments_<tag>.lmdb``."""
    return Path(settings["path_output"]) / f"assignments_{tag(scale)}.lmdb"


def query_cache_name(scale: float) -> str:
    """Step D's query cache of an extra scale: ``query_words_<tag>.lmdb``."""
    return f"query_words_{tag(scale)}.lmdb"


def combine(vectors: list[SparseVec], scales: list[float]) -> SparseVec:
    """The image's vector from its per-scale L2-normalised BoW vectors: their sum weighted
    by the scale squared (each cell of every scale then weighs about the same),
    L2-normalised. One scale gives its vector unchanged."""
    if len(vectors) != len(scales):
        raise ValueError(f"{len(vectors)} vectors for {len(scales)} scales")
    if len(vectors) == 1:
        return vectors[0]
    return l2_normalise(sparse_sum(list(vectors), [s * s for s in scales]))


def image_vector(image_id: str, store: Any, scale_stores: list[tuple[float, Any]],
                 weighting: str, n_words: int) -> SparseVec:
    """A database image's vector (step C's index, the expansions' database vectors): its
    BoW at scale 1 (``store``) or, with extra scales, :func:`combine` over the scales
    whose assignment store (``scale_stores``: (scale, store)) holds it; an image
    unreadable at a scale keeps the others."""
    vec = database_vector(store.get(image_id)[0], weighting, n_words)
    if not scale_stores:
        return vec
    vecs, scales = [vec], [1.0]
    for sc, st in scale_stores:
        if image_id in st:
            vecs.append(database_vector(st.get(image_id)[0], weighting, n_words))
            scales.append(sc)
    return combine(vecs, scales)
