"""Where step B's models live and how later steps load them safely.

Why a checked loader: the original loaded whichever pickle a hard-coded path named, so
an Oxford run could silently use a Paris, conv5_2 or 512x384 vocabulary. Here both model
records carry the feature provenance and the training fields; ``load_models`` refuses a
model that disagrees with the settings, naming the field and the step to rerun.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib.artefacts import check_fields
from lib.errors import ArtefactMismatchError
from lib.vocabulary.codebook import Codebook
from lib.vocabulary.pca import PCAWhitening

PCA_FIELDS = ("l2norm", "pca_dim", "whiten", "train_on", "train_new_dim")
CODEBOOK_FIELDS = (*PCA_FIELDS, "n_centers")
HINT = ("rerun step B with TRAIN_PCA and TRAIN_CENTROIDS true, or point path_models at "
        "models made with these settings")


def models_paths(settings: Mapping[str, Any]) -> tuple[Path, Path]:
    """(pca.npz, codebook.npy) under ``path_models``."""
    base = Path(settings["path_models"])
    return base / "pca.npz", base / "codebook.npy"


def training_fields(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that shape the PCA and the codebook beyond the feature provenance.
    ``new_dim`` matters for training only when training on upsampled maps."""
    up = settings["train_on"] == "upsampled"
    return {
        "l2norm": bool(settings["l2norm"]),
        "pca_dim": int(settings["pca_dim"]),
        "whiten": bool(settings["whiten"]),
        "train_on": settings["train_on"],
        "train_new_dim": list(settings["new_dim"]) if up and settings["new_dim"] else None,
        "n_centers": int(settings["n_centers"]),
    }


def expected_provenance(settings: Mapping[str, Any]) -> dict[str, Any]:
    from lib.features.networks import feature_provenance

    return dict(feature_provenance(settings))


def check_provenance(expected: Mapping[str, Any], meta: Mapping[str, Any], what: str,
                     hint: str) -> None:
    """Every provenance field the settings define must match the artefact's record."""
    found = meta.get("provenance")
    if not isinstance(found, Mapping):
        raise ArtefactMismatchError(f"{what}: no feature provenance in its metadata; {hint}")
    # the most telling field first: a changed network also changes its layers and
    # preprocessing, and the message should name the network
    first = [f for f in ("network", "weights", "layers") if f in expected]
    check_fields(expected, found, first + sorted(set(expected) - set(first)), what, hint)


def check_pca(pca: PCAWhitening, path: Path, settings: Mapping[str, Any],
              provenance: Mapping[str, Any]) -> None:
    check_provenance(provenance, pca.meta, str(path), HINT)
    check_fields(training_fields(settings), pca.meta, PCA_FIELDS, str(path), HINT)


def check_codebook(codebook: Codebook, path: Path, settings: Mapping[str, Any],
                   provenance: Mapping[str, Any], pca: PCAWhitening) -> None:
    check_provenance(provenance, codebook.meta, str(path), HINT)
    check_fields(training_fields(settings), codebook.meta, CODEBOOK_FIELDS, str(path), HINT)
    check_fields({"pca_hash": pca.content_hash()}, codebook.meta, ("pca_hash",), str(path),
                 "the codebook was trained in another PCA space; rerun step B with "
                 "TRAIN_CENTROIDS true")
    if codebook.dim != pca.dim_out:
        raise ArtefactMismatchError(f"{path}: words are {codebook.dim}-D but the PCA outputs "
                                    f"{pca.dim_out}-D; {HINT}")


ASSIGNMENT_FIELDS = ("new_dim", "l2norm", "pca_hash", "codebook_hash", "n_centers",
                     "assignment")


def assignment_record(settings: Mapping[str, Any], pca: PCAWhitening,
                      codebook: Codebook) -> dict[str, Any]:
    """The record that defines an assignment map: step C writes it into the assignment
    store and the index, streaming checks the store against it, and step D's query
    encoder compares it with both (and keys its query cache with it)."""
    nd = settings["new_dim"]
    return {
        "provenance": expected_provenance(settings),
        "new_dim": list(nd) if nd else None,
        "l2norm": bool(settings["l2norm"]),
        "pca_hash": pca.content_hash(),
        "codebook_hash": codebook.content_hash(),
        "n_centers": int(codebook.k),
        "assignment": settings["assignment"],
    }


def check_assignment_record(expected: Mapping[str, Any], found: Mapping[str, Any], what: str,
                            hint: str = "rerun step C with these settings") -> None:
    """Refuse assignment maps made with other features or models, naming the field."""
    check_provenance(expected["provenance"], found, what, hint)
    check_fields(expected, found, ASSIGNMENT_FIELDS, what, hint)


def load_models(settings: Mapping[str, Any]) -> tuple[PCAWhitening, Codebook]:
    """PCA-whitening and codebook of this run, checked against the settings. The
    codebook assigns in ``settings.assignment`` mode on ``settings.device``."""
    p_pca, p_cb = models_paths(settings)
    prov = expected_provenance(settings)
    pca = PCAWhitening.load(p_pca)
    check_pca(pca, p_pca, settings, prov)
    cb = Codebook.load(p_cb, mode=settings["assignment"], device=settings["device"])
    check_codebook(cb, p_cb, settings, prov, pca)
    return pca, cb
