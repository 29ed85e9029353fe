"""Steps B and C end to end on a tiny feature store written with step A's store code:
models and their metadata, reproducibility, assignment maps against a direct
computation, the inverted file, resume of C, and refusal of models made with other
network / layer / input-size settings."""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import numpy as np
import pytest

from lib.errors import ArtefactMismatchError, UserError
from lib.features.extraction import store_meta
from lib.features.feature_store import FeatureStore
from lib.features.local_features import LocalFeatureReader, maps_to_features
from lib.features.networks import feature_provenance
from lib.index.assignment_store import AssignmentStore
from lib.index.bow import sparse_dot
from lib.index.encoding import database_vector, word_dtype
from lib.provenance import load_models, models_paths
from lib.settings import load_settings
from lib.vocabulary.codebook import Codebook
from lib.vocabulary.pca import PCAWhitening

C_CH = 24  # channels of the synthetic maps (any C works; the reader does not care)
DB = [f"img_{i:02d}" for i in range(10)]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    gt = {"imlist": [*DB, "img_missing"], "qimlist": ["img_00"], "gnd": [{"ok": [1]}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "s.json").write_text(json.dumps({
        "dataset": "toy", "gt_format": "generic", "path_images": "imgs", "path_gt": "gt.json",
        "path_output": "out", "network": "vgg16", "weights": "random",
        "layers": ["conv5_1"], "input_size": [64, 48], "new_dim": [8, 6],
        "pca_dim": 16, "n_centers": 12, "kmeans_iter": 4, "n_samples": 100000,
        "seed": 3, "device": "cpu",
    }))
    s = load_settings(tmp_path / "s.json")
    rng = np.random.default_rng(0)
    recs = []
    for n, i in enumerate(DB):  # native 4x3 maps; every third image landscape (3x4)
        shape = (C_CH, 3, 4) if n % 3 == 0 else (C_CH, 4, 3)
        maps = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
        recs.append((i, {"conv5_1": maps}, (shape[1] * 10, shape[2] * 10)))
    with FeatureStore.create(FeatureStore.path_for(s),
                             store_meta(s, feature_provenance(s), len(recs), "t", True)) as st:
        st.put_many(recs)
    return tmp_path


def step(name: str, run_dir: Path, *overrides: str) -> tuple[int, str]:
    """Run step B or C's entry point on ``s.json`` with ``--set``-style ``overrides``:
    (0, its summary) or, when it refuses, (the exit code, the one-line error)."""
    from lib.index.step import build_index
    from lib.vocabulary.step import train_models

    fn = {"B": train_models, "C": build_index}[name]
    try:
        return 0, fn(load_settings(run_dir / "s.json", overrides=list(overrides))).summary
    except UserError as e:
        assert "\n" not in str(e)
        return e.exit_code, str(e)


def settings(run_dir: Path, **over):
    return load_settings(run_dir / "s.json", overrides=over)


def test_b_then_c(run_dir):
    code, out = step("B", run_dir)
    assert code == 0, out
    s = settings(run_dir)
    p_cb = models_paths(s)[1]
    meta = json.loads(p_cb.with_suffix(".json").read_text())
    assert meta["provenance"] == feature_provenance(s)
    assert meta["n_centers"] == 12 and meta["pca_dim"] == 16 and meta["seed"] == 3
    assert meta["n_train_features"] == 10 * 12 and meta["n_train_images"] == 10
    pca, cb = load_models(s)
    assert (cb.k, cb.dim, pca.dim_in) == (12, 16, C_CH)
    assert meta["pca_hash"] == pca.content_hash()

    # the same settings into another models folder: the same codebook (seeded)
    code, out = step("B", run_dir, f"path_models={run_dir / 'models2'}")
    assert code == 0, out
    np.testing.assert_array_equal(np.load(run_dir / "models2" / "codebook.npy"), cb.centroids)

    code, out = step("C", run_dir)
    assert code == 0, out
    assert "1 missing" in out  # img_missing has no features: warned about, left out
    store = FeatureStore(FeatureStore.path_for(s))
    reader = LocalFeatureReader(store, [8, 6], l2norm=True, pca=pca)
    with AssignmentStore(AssignmentStore.path_for(s)) as asg:
        assert asg.ids() == DB
        assert asg.meta["pca_hash"] == pca.content_hash()
        for n, i in enumerate(DB):
            words, orig = asg.get(i)
            hw = (6, 8) if n % 3 == 0 else (8, 6)  # new_dim follows the orientation
            assert words.shape == hw and words.dtype == word_dtype(12)
            assert orig == ((30, 40) if n % 3 == 0 else (40, 30))
            feats = maps_to_features(reader.maps(i), True, pca)
            d = ((feats[:, None, :].astype(np.float64) - cb.centroids[None]) ** 2).sum(-1)
            np.testing.assert_array_equal(words.ravel(), d.argmin(1))
    from lib.index.inverted_file import InvertedFile

    inv = InvertedFile.load(run_dir / "out" / "index")
    assert inv.image_ids == DB and inv.n_words == 12
    assert inv.meta["codebook_hash"] == cb.content_hash()
    with AssignmentStore(AssignmentStore.path_for(s)) as asg:
        vecs = [database_vector(asg.get(i)[0], "centre_prior", 12) for i in DB]
    sc = inv.scores(vecs[4])
    expect = np.array([sparse_dot(vecs[4], v) for v in vecs], np.float32)
    np.testing.assert_allclose(sc, expect, atol=2e-3)  # weights are quantised on disk


def test_c_resumes_and_skips_stored_maps(run_dir):
    assert step("B", run_dir)[0] == 0
    assert step("C", run_dir)[0] == 0
    s = settings(run_dir)
    apath = AssignmentStore.path_for(s)
    with AssignmentStore(apath) as asg:
        full = {i: asg.get(i) for i in asg.ids()}
    # an interrupted run: only the first batches were committed
    env = lmdb.open(str(apath), subdir=True)
    with env.begin(write=True) as txn:
        for i in DB[4:]:
            txn.delete(i.encode())
    env.close()
    # a stored map is never recomputed: mark one to prove it is skipped
    with AssignmentStore(apath, readonly=False) as asg:
        asg.put_many([("img_01", np.full((8, 6), 11, np.uint16), (40, 30))])
    code, out = step("C", run_dir)
    assert code == 0, out
    assert "6 images assigned" in out
    with AssignmentStore(apath) as asg:
        assert asg.ids() == DB
        assert (asg.get("img_01")[0] == 11).all()
        for i in DB[4:]:
            np.testing.assert_array_equal(asg.get(i)[0], full[i][0])
            assert asg.get(i)[1] == full[i][1]


def test_approximate_assignment_mode(run_dir):
    assert step("B", run_dir, "kmeans=approximate")[0] == 0
    code, out = step("C", run_dir, "kmeans=approximate", "assignment=approximate")
    assert code == 0, out
    s = settings(run_dir)
    with AssignmentStore(AssignmentStore.path_for(s)) as asg:
        assert asg.meta["assignment"] == "approximate" and asg.meta["tuned_agreement"] >= 0.97
        assert "n_candidates" in asg.meta
        assert len(asg) == len(DB)
    # a store made by the earlier HNSW search is refused in one line, not mixed with new maps
    with AssignmentStore(AssignmentStore.path_for(s), readonly=False) as asg:
        asg.set_meta({**asg.meta, "ef_search": 24})
    code, out = step("C", run_dir, "kmeans=approximate", "assignment=approximate")
    assert code == 2 and "older approximate search (HNSW)" in out


@pytest.mark.parametrize("key,value,extra", [
    ("input_size", "[80,60]", ()), ("layers", '["conv5_2"]', ()),
    # another network needs its own layer names (an unknown layer is refused earlier)
    ("network", "resnet50", ('layers=["layer3"]',)), ("pca_dim", "8", ()),
    ("n_centers", "10", ())])
def test_models_from_other_settings_are_refused(run_dir, key, value, extra):
    assert step("B", run_dir)[0] == 0
    code, out = step("C", run_dir, f"{key}={value}", *extra)
    assert code == 2
    assert f"field '{key}'" in out and "step B" in out and "Traceback" not in out
    with pytest.raises(ArtefactMismatchError, match=f"field '{key}'"):
        changes = {key: json.loads(value) if value[0] in "[0123456789" else value}
        if extra:
            changes["layers"] = json.loads(extra[0].split("=", 1)[1])
        load_models(settings(run_dir, **changes))


def test_reuse_checks_and_refuses(run_dir):
    assert step("B", run_dir)[0] == 0
    s = settings(run_dir)
    before = models_paths(s)[1].stat().st_mtime_ns
    code, out = step("B", run_dir, "TRAIN_PCA=false", "TRAIN_CENTROIDS=false")
    assert code == 0 and "nothing to train" in out
    assert models_paths(s)[1].stat().st_mtime_ns == before
    # reusing a codebook while asking for another vocabulary size is refused
    code, out = step("B", run_dir, "TRAIN_CENTROIDS=false", "n_centers=10")
    assert code == 2 and "field 'n_centers'" in out
    # a freshly refitted PCA on another sample gives a different space: the old
    # codebook no longer fits it
    code, out = step("B", run_dir, "TRAIN_CENTROIDS=false", "max_train_images=5")
    assert code == 2 and "pca_hash" in out


def test_pca_and_codebook_files_load_standalone(run_dir):
    assert step("B", run_dir)[0] == 0
    s = settings(run_dir)
    p_pca, p_cb = models_paths(s)
    pca = PCAWhitening.load(p_pca)
    cb = Codebook.load(p_cb)
    assert pca.meta["train_on"] == "native" and pca.meta["train_new_dim"] is None
    assert cb.meta["kmeans"] == "exact" and np.isfinite(cb.meta["kmeans_objective"])


def test_b_samples_per_image_when_features_do_not_fit(run_dir):
    code, out = step("B", run_dir, "n_samples=50", "max_train_images=7")
    assert code == 0, out
    meta = PCAWhitening.load(models_paths(settings(run_dir))[0]).meta
    # 7 seeded images x ceil(50 / 7) = 8 features each = 56, trimmed to 50
    assert meta["n_train_images"] == 7 and meta["n_train_features"] == 50
    assert meta["n_fit"] == 50
