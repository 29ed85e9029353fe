"""Provenance: the records that define each artefact, and the checks against them.

Every artefact carries the feature provenance (network, weights and their file's hash,
layers, input size, preprocessing) plus its own fields: B's models the training fields,
C's assignment maps :func:`assignment_record`, the index the same record plus its
weighting. A later step compares what its settings ask for with what it finds and
refuses with the field named.

Why a checked loader: the original loaded whichever pickle a hard-coded path named, so
an Oxford run could silently use a Paris, conv5_2 or 512x384 vocabulary.

:func:`step_hash` is what ``run_all`` and every artefact's ``settings_hash`` use: the
settings keys that affect a step and every earlier one, plus the identity of every input
file those steps read (:func:`step_inputs`). Paths themselves are left out, so a run
folder copied elsewhere stays up to date; what a path points at is not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lib.artefacts import canonical_hash, check_fields
from lib.errors import ArtefactMismatchError, UserError
from lib.settings import STEPS
from lib.vocabulary.codebook import Codebook
from lib.vocabulary.pca import PCAWhitening

PCA_FIELDS = ("l2norm", "pca_dim", "whiten", "train_on", "train_new_dim")
CODEBOOK_FIELDS = (*PCA_FIELDS, "n_centers")
# how the training sample was drawn and how k-means ran: recorded in the codebook's
# metadata by step B, compared by every later load (the codebook pins its PCA through
# ``pca_hash``, so the PCA needs no separate check; a PCA reused on purpose to train a
# codebook with another seed stays allowed). Reused models
# (TRAIN_* false, the 105k/106k/R1M settings) are compared too: those settings inherit
# these keys from the run that trained them, and a run whose settings name another seed
# than its models' would record a provenance that is not true. A field absent from the
# metadata (models written by hand, not by step B) is not compared.
KMEANS_FIELDS = ("seed", "n_samples", "max_train_images", "kmeans", "kmeans_iter")
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


def sample_fields(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Step B's sampling and k-means settings (:data:`KMEANS_FIELDS`)."""
    return {"seed": int(settings["seed"]), "n_samples": int(settings["n_samples"]),
            "max_train_images": int(settings["max_train_images"]),
            "kmeans": settings["kmeans"], "kmeans_iter": int(settings["kmeans_iter"])}


def check_kmeans_fields(settings: Mapping[str, Any], meta: Mapping[str, Any],
                        what: str, hint: str = HINT) -> None:
    """The codebook's recorded :data:`KMEANS_FIELDS` against the settings (those it
    records)."""
    check_fields(sample_fields(settings), meta, [f for f in KMEANS_FIELDS if f in meta],
                 what, hint)


def expected_provenance(settings: Mapping[str, Any]) -> dict[str, Any]:
    from lib.features.networks import feature_provenance

    return dict(feature_provenance(settings))


def check_provenance(expected: Mapping[str, Any], meta: Mapping[str, Any], what: str,
                     hint: str) -> None:
    """Every provenance field the settings define must match the artefact's record. A
    feature store that step A has not finished (``complete`` false in its metadata: A
    was interrupted) is refused whatever its provenance: only feature stores carry the
    field, and every reader of one (B, C, D's pooling baseline) checks it here."""
    if meta.get("complete") is False:
        raise UserError(f"{what}: feature store is incomplete (step A was interrupted after "
                        f"{meta.get('count', '?')} images); rerun step A to finish it")
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
    check_kmeans_fields(settings, codebook.meta, str(path))
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
    rec = {
        "provenance": expected_provenance(settings),
        "new_dim": list(nd) if nd else None,
        "l2norm": bool(settings["l2norm"]),
        "pca_hash": pca.content_hash(),
        "codebook_hash": codebook.content_hash(),
        "n_centers": int(codebook.k),
        "assignment": settings["assignment"],
    }
    if settings["kernel"] != "bow":  # BoW records stay as they were before kernels
        rec["kernel"] = settings["kernel"]
        rec["asmk_bits"] = asmk_bits(settings, codebook.dim)
    if settings["keep_cells"] < 1.0:  # and as they were before keep_cells
        rec["keep_cells"] = float(settings["keep_cells"])
    return rec


def asmk_bits(settings: Mapping[str, Any], dim: int) -> int:
    """Bits per ASMK signature: ``asmk_bits``, or the whole (PCA) feature dimension."""
    n = settings["asmk_bits"]
    if n is None:
        return int(dim)
    if not 1 <= int(n) <= dim:
        raise UserError(f"settings key 'asmk_bits': {n} is not in 1..{dim} (the PCA "
                        "dimension)")
    return int(n)


def check_assignment_record(expected: Mapping[str, Any], found: Mapping[str, Any], what: str,
                            hint: str = "rerun step C with these settings") -> None:
    """Refuse assignment maps made with other features or models, naming the field."""
    check_provenance(expected["provenance"], found, what, hint)
    # BoW records carry no kernel fields (they predate kernels): missing means bow; and
    # no keep_cells field unless it drops cells
    bow = {"kernel": "bow", "asmk_bits": None, "keep_cells": 1.0}
    check_fields({**bow, **expected}, {**bow, **found}, ASSIGNMENT_FIELDS + tuple(bow), what,
                 hint)


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


# --------------------------------------------------------------------- input identities


def file_identity(path: str | Path | None) -> list[int] | None:
    """``[size, mtime_ns]`` of a file, or None when there is none. Cheap (one ``stat``):
    a rewritten file changes its mtime, and a copy made with its times (``cp -p``,
    ``shutil.copytree``) keeps them."""
    if path is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def content_identity(path: str | Path | None) -> str | None:
    """SHA-256 of a small file's bytes (ground truth, a store's metadata), or of a
    folder's listing with each file's identity; None when absent."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    if p.is_dir():
        return canonical_hash([[f.relative_to(p).as_posix(), file_identity(f)]
                               for f in sorted(p.rglob("*")) if f.is_file()])
    return None


def images_identity(settings: Mapping[str, Any], ids: Iterable[str],
                    query: bool = False) -> str:
    """One digest over ``(id, size, mtime_ns)`` of every image: another folder with the
    same image names, or one rewritten photo, gives another digest."""
    from lib.groundtruth.loader import image_path

    h = hashlib.sha256()
    for i in ids:
        try:
            ident = file_identity(image_path(settings, i, query=query))
        except UserError:  # missing: the step itself reports it
            ident = None
        h.update(f"{i}\t{ident}\n".encode())
    return h.hexdigest()[:16]


def _store_identity(path: str | Path | None) -> list[int] | None:
    """Another run's feature store (``train_store``): its data file's size and mtime. Not
    its metadata record: reading that means opening the environment, which LMDB refuses
    while the same process holds it open (step B reading that store)."""
    return None if path is None else file_identity(Path(path) / "data.mdb")


def _ground_truth(settings: Mapping[str, Any]) -> Any:
    """The ground truth, or None when it cannot be read (the step reports it when it
    runs; a hash must not fail first)."""
    from lib.groundtruth.loader import load_ground_truth

    try:
        return load_ground_truth(settings)
    except UserError:
        return None


def step_inputs(settings: Mapping[str, Any], step: str, gt: Any) -> dict[str, Any]:
    """The identity of every input file ``step`` itself reads (earlier steps' inputs are
    added by :func:`step_hash`). A: the ground truth, the weights file (inside the feature
    provenance) and every database image; B: ``train_store``'s data file and the models it
    reuses instead of training; D: every query image. ``gt``: the loaded ground truth
    (None: unreadable), passed in so that hashing several steps reads it once (the
    distractor listing of a 1M set is not free)."""
    if step == "A":
        try:
            prov: dict[str, Any] | None = expected_provenance(settings)
        except UserError:  # e.g. a missing weights file: step A reports it
            prov = None
        return {"feature_provenance": prov,
                "path_gt": content_identity(settings["path_gt"]),
                "images": None if gt is None else images_identity(settings, gt.db_ids)}
    if step == "B":
        p_pca, p_cb = models_paths(settings)
        return {"train_store": _store_identity(settings["train_store"]),
                "reused_pca": None if settings["TRAIN_PCA"] else file_identity(p_pca),
                "reused_codebook": (None if settings["TRAIN_CENTROIDS"]
                                    else file_identity(p_cb))}
    if step == "D":
        return {"queries": None if gt is None else images_identity(
            settings, [q.image for q in gt.queries], query=True)}
    return {}


def step_hash(settings: Any, step: str, keys: Mapping[str, Any]) -> str:
    """Hash of ``keys`` (the settings keys that affect ``step`` or an earlier step) and of
    the identities of the input files of ``step`` and every earlier step. Equal hashes:
    the step's output would be the same."""
    upto = STEPS[: STEPS.index(step) + 1]
    gt = _ground_truth(settings)  # once for A's and D's inputs
    return canonical_hash({"keys": dict(keys),
                           "inputs": {s: step_inputs(settings, s, gt) for s in upto}})
