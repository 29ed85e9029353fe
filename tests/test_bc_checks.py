"""Steps B and C check their inputs before they work (issue 19, items 4, 5, 11, 12):
an interrupted step A's feature store is refused by every reader, the models are checked
against their metadata (shape, dtype, finiteness, content hash), every step B setting is
validated before anything is written, image ids before the assignment work, and step B's
sampling and k-means settings recorded in the codebook are compared by C and D."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lib.features.feature_store import FeatureStore
from tests.helpers_pipeline import (
    assert_one_error,
    call_step,
    copy_dataset,
    load,
    make_dataset,
    refusal,
    run_pipeline,
    tree,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A finished A -> B run (settings path) the cases start from."""
    root = tmp_path_factory.mktemp("built_bc")
    s = make_dataset(root)
    run_pipeline(s, "AB")
    return s




def _store(s: Path) -> Path:
    return FeatureStore.path_for(load(s))


def _mark_incomplete(store: Path) -> None:
    """What a step A killed mid-way leaves: ``complete`` false in the metadata."""
    st = FeatureStore(store, readonly=False)
    try:
        st.set_meta({**st.meta, "complete": False})
    finally:
        st.close()
    gc.collect()


# ----------------------------------------------------------- 4: interrupted step A


def test_b_refuses_an_incomplete_store(built, tmp_path):
    s = copy_dataset(built, tmp_path / "r")
    shutil.rmtree(s.parent / "run" / "models")
    store = _store(s)
    _mark_incomplete(store)
    err = refusal("B", s)
    assert_one_error(err, str(store), "incomplete", "rerun step A")
    assert not (s.parent / "run" / "models").exists()


def test_b_refuses_an_incomplete_train_store(built, tmp_path):
    """``train_store`` names another run's store: it must be complete too."""
    other = copy_dataset(built, tmp_path / "other")
    store = _store(other)
    _mark_incomplete(store)
    s = copy_dataset(built, tmp_path / "r")
    models = tmp_path / "models_new"
    err = refusal("B", s, f"train_store={store}", f"path_models={models}")
    assert_one_error(err, str(store), "incomplete", "rerun step A")
    assert not models.exists()
    # and a complete train_store is used (B reads another run's store)
    other_ok = copy_dataset(built, tmp_path / "other_ok")
    res = call_step("B", s, f"train_store={_store(other_ok)}", f"path_models={models}")
    assert res.counts["codebook_fitted"] is True


def test_c_and_pooling_refuse_an_incomplete_store(built, tmp_path):
    s = copy_dataset(built, tmp_path / "r")
    store = _store(s)
    _mark_incomplete(store)
    err = refusal("C", s)
    assert_one_error(err, str(store), "incomplete", "rerun step A")
    assert not (s.parent / "run" / "assignments.lmdb").exists()
    assert not (s.parent / "run" / "index").exists()

    from lib.errors import UserError
    from lib.search.step import rank_pooling

    with pytest.raises(UserError) as e:
        rank_pooling(load(s, "pooling=gem"))
    assert_one_error(e.value, str(store), "incomplete", "rerun step A")
    gc.collect()


def test_complete_store_still_accepted(built, tmp_path):
    """A finished store (``complete`` true) passes, as before."""
    s = copy_dataset(built, tmp_path / "r")
    assert call_step("C", s).counts["indexed"] == 8


# ----------------------------------------------------------- 5: models vs metadata


def _codebook(s: Path) -> Path:
    return s.parent / "run" / "models" / "codebook.npy"


@pytest.mark.parametrize("damage", ["fewer_rows", "transposed", "permuted", "nan",
                                    "float64"])
def test_c_refuses_a_codebook_that_does_not_match_its_metadata(built, tmp_path, damage):
    s = copy_dataset(built, tmp_path / "r")
    p = _codebook(s)
    c = np.load(p)
    bad = {"fewer_rows": c[:-1], "transposed": np.ascontiguousarray(c.T),
           "permuted": c[::-1].copy(), "nan": np.where(np.arange(c.size).reshape(c.shape) == 3,
                                                        np.nan, c).astype(np.float32),
           "float64": c.astype(np.float64)}[damage]
    np.save(p, bad)
    err = refusal("C", s)
    assert_one_error(err, "codebook.npy", "rerun step B")
    assert not (s.parent / "run" / "assignments.lmdb").exists()


def test_c_refuses_a_pca_that_does_not_match_its_metadata(built, tmp_path):
    s = copy_dataset(built, tmp_path / "r")
    p = s.parent / "run" / "models" / "pca.npz"
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["components"] = arrays["components"][::-1].copy()
    np.savez(p, **arrays)
    err = refusal("C", s)
    assert_one_error(err, "pca.npz", "pca_hash", "rerun step B")


def test_codebook_and_sidecar_from_two_writes_are_refused(built, tmp_path):
    """A kill between the renames of codebook.npy and codebook.json leaves the new words
    with the previous run's sidecar: refused on load (hash check), never used."""
    s = copy_dataset(built, tmp_path / "r")
    side = _codebook(s).with_suffix(".json")
    old = side.read_bytes()
    call_step("B", s, "seed=1")  # same shape, other words
    side.write_bytes(old)  # the pair as the kill leaves it
    err = refusal("C", s)
    assert_one_error(err, "codebook.npy", "codebook_hash", "rerun step B")


# ----------------------------------------------------------- 11: late refusals


def test_kmeans_iter_zero_refused_before_anything_is_written(built, tmp_path):
    s = copy_dataset(built, tmp_path / "r")
    shutil.rmtree(s.parent / "run" / "models")
    err = refusal("B", s, "kmeans_iter=0")
    assert_one_error(err, "kmeans_iter")
    assert tree(s.parent / "run" / "models") == []


def test_newline_in_image_id_refused_before_assignment(tmp_path):
    root = tmp_path / "r"
    s = make_dataset(root)
    bad = "img\n08"
    shutil.copy(root / "images" / "img_00.jpg", root / "images" / f"{bad}.jpg")
    gt = json.loads((root / "gt.json").read_text())
    gt["imlist"].append(bad)
    (root / "gt.json").write_text(json.dumps(gt))
    run_pipeline(s, "AB")
    err = refusal("C", s)
    assert_one_error(err, repr(bad), "line break")
    assert not (root / "run" / "assignments.lmdb").exists()


# ----------------------------------------------------------- 12: B's settings in C, D


@pytest.mark.parametrize("override,field", [
    ("seed=1", "seed"), ("n_samples=1000", "n_samples"), ("kmeans_iter=4", "kmeans_iter"),
    ("kmeans=approximate", "kmeans"), ("max_train_images=5", "max_train_images")])
def test_c_refuses_models_trained_with_other_b_settings(built, tmp_path, override, field):
    s = copy_dataset(built, tmp_path / "r")
    err = refusal("C", s, override)
    assert_one_error(err, "codebook", f"'{field}'")
    assert not (s.parent / "run" / "assignments.lmdb").exists()


def test_d_compares_b_settings_too(built):
    from lib.errors import ArtefactMismatchError
    from lib.provenance import load_models

    load_models(load(built))
    with pytest.raises(ArtefactMismatchError, match="'seed'"):
        load_models(load(built, "seed=7"))


def test_reused_models_with_inherited_b_settings_pass(built, tmp_path):
    """The 105k/106k pattern: another output folder reuses this run's models and store
    (TRAIN_* false, same B keys): B has nothing to train and C accepts the models."""
    s = copy_dataset(built, tmp_path / "r")
    run = s.parent / "run"
    over = (f"path_output={tmp_path / 'big'}", f"path_models={run / 'models'}",
            f"path_features={run / 'features'}", "TRAIN_PCA=false", "TRAIN_CENTROIDS=false")
    assert call_step("B", s, *over).counts["codebook_fitted"] is False
    assert call_step("C", s, *over).counts["indexed"] == 8
    err = refusal("B", s, *over, "kmeans_iter=5")
    assert_one_error(err, "codebook", "'kmeans_iter'")
