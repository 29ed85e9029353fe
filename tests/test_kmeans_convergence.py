"""k-means stops once converged (kmeans_tol), deterministically, and records why; the
codebook size "auto" and the training-sample estimate that lets a too-large n_centers be
refused before step A."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lib.errors import SettingsError, UserError
from lib.provenance import load_models, models_paths
from lib.vocabulary.codebook import converged, train_kmeans
from lib.vocabulary.sizing import (
    auto_centers,
    check_codebook_size,
    estimate_training_features,
    resolve_from_codebook,
)
from tests.helpers_pipeline import make_dataset, refusal
from tests.test_bc_steps import run_dir as run_dir  # the tiny feature store fixture
from tests.test_bc_steps import settings, step


def _blobs(n: int = 3000, d: int = 16, k: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32) * 4
    x = centres[rng.integers(0, k, n)] + rng.standard_normal((n, d)).astype(np.float32) * 0.3
    return x.astype(np.float32)


def test_converged_rule():
    assert not converged(float("nan"), 10.0, 1e-4)  # the first iteration has no previous
    assert not converged(100.0, 99.0, 1e-4)
    assert converged(100.0, 99.999, 1e-4)
    assert converged(100.0, 100.5, 1e-4)  # no progress at all
    assert not converged(100.0, 100.0, 0.0)  # tol 0: never


@pytest.mark.parametrize("mode", ["exact", "approximate"])
def test_kmeans_stops_when_converged_and_stays_deterministic(mode):
    """Well separated blobs converge in a few iterations: the loop stops there, says so,
    and gives exactly the centroids of a run capped at that many iterations (the stop
    changes how many iterations run, nothing else); the same seed gives the same bytes."""
    x = _blobs()
    a = train_kmeans(x, 20, niter=50, seed=3, mode=mode, device="cpu", tol=1e-4)
    assert a.stop == "converged" and 1 < a.niter < 50
    b = train_kmeans(x, 20, niter=50, seed=3, mode=mode, device="cpu", tol=1e-4)
    assert b.niter == a.niter and a.centroids.tobytes() == b.centroids.tobytes()
    capped = train_kmeans(x, 20, niter=a.niter, seed=3, mode=mode, device="cpu", tol=0.0)
    assert capped.stop == "max_iter" and capped.niter == a.niter
    assert capped.centroids.tobytes() == a.centroids.tobytes()
    full = train_kmeans(x, 20, niter=a.niter + 3, seed=3, mode=mode, device="cpu", tol=0.0)
    assert full.niter == a.niter + 3 and full.stop == "max_iter"
    # converged means converged: the extra iterations barely move the objective
    assert full.objective <= a.objective * (1 + 1e-6)
    assert full.objective >= a.objective * (1 - 1e-3)


def test_approximate_kmeans_with_a_shortlist_honours_the_tolerance():
    """With at least 1,024 words the approximate mode really searches a shortlist; the
    tolerance stops it too, reproducibly."""
    x = _blobs(n=8192, d=8, k=64, seed=1)
    a = train_kmeans(x, 1024, niter=40, seed=0, mode="approximate", device="cpu", tol=1e-2)
    b = train_kmeans(x, 1024, niter=40, seed=0, mode="approximate", device="cpu", tol=1e-2)
    assert a.stop == "converged" and a.niter < 40
    assert (a.niter, a.centroids.tobytes()) == (b.niter, b.centroids.tobytes())


def test_codebook_metadata_records_iterations_and_stop(run_dir):
    code, out = step("B", run_dir, "kmeans_iter=60", "kmeans_tol=1e-3")
    assert code == 0, out
    meta = json.loads(models_paths(settings(run_dir))[1].with_suffix(".json").read_text())
    assert meta["kmeans_stop"] == "converged" and meta["kmeans_iterations_run"] < 60
    assert meta["kmeans_iter"] == 60 and meta["kmeans_tol"] == 1e-3
    assert meta["n_centers_setting"] == 12
    assert f"{meta['kmeans_iterations_run']} k-means iterations (converged)" in out
    code, out = step("B", run_dir, "kmeans_iter=2", "kmeans_tol=0")
    assert code == 0, out
    meta = json.loads(models_paths(settings(run_dir))[1].with_suffix(".json").read_text())
    assert (meta["kmeans_stop"], meta["kmeans_iterations_run"]) == ("max_iter", 2)


def test_auto_rule():
    assert auto_centers(20160) == 2016
    assert auto_centers(5) == 1
    assert auto_centers(10**7) == 25000


def test_n_centers_auto_is_resolved_recorded_and_read_back(run_dir):
    """B picks a tenth of its sample, records that it came from "auto"; the later steps
    read the number back from the codebook and check the models against it."""
    code, out = step("B", run_dir, "n_centers=auto")
    assert code == 0, out
    s = settings(run_dir, n_centers="auto")
    meta = json.loads(models_paths(s)[1].with_suffix(".json").read_text())
    assert meta["n_train_features"] == 120
    assert meta["n_centers"] == auto_centers(120) == 12
    assert meta["n_centers_setting"] == "auto"
    assert "+ 12 words (auto)" in out
    resolved = resolve_from_codebook(s)
    assert resolved.n_centers == 12
    _, cb = load_models(resolved)
    assert cb.k == 12
    from lib.index.step import build_index

    assert build_index(resolved).counts  # what C's command line runs on "auto" settings
    # a codebook trained with a fixed size does not stand for "auto"
    code, out = step("B", run_dir, "n_centers=12")
    assert code == 0, out
    with pytest.raises(UserError, match="field 'n_centers' is 12 \\(a fixed size\\) but the "
                                        'settings ask for "auto"'):
        resolve_from_codebook(s)


def test_estimate_matches_the_sample_step_b_draws(run_dir):
    """The estimate is the sample size for fixed-size maps: vgg16 conv5_1 (stride 16) at
    64x48 gives 4x3 cells per image; step B's recorded count agrees."""
    for over, expect in (({}, 120), ({"n_samples": 50, "max_train_images": 7}, 50),
                         ({"max_train_images": 4}, 48)):
        s = settings(run_dir, **over)
        assert estimate_training_features(s, 10) == expect
        code, out = step("B", run_dir, *(f"{k}={v}" for k, v in over.items()),
                         "n_centers=8")
        assert code == 0, out
        meta = json.loads(models_paths(s)[1].with_suffix(".json").read_text())
        assert meta["n_train_features"] == expect
    # upsampled training maps: new_dim cells; unknown when map sizes vary
    assert estimate_training_features(settings(run_dir, train_on="upsampled"), 10) == 480
    assert estimate_training_features(settings(run_dir, resize="max_side"), 10) is None


def test_too_many_centers_is_refused_with_the_largest_valid_value(run_dir):
    s = settings(run_dir, n_centers=500)
    with pytest.raises(SettingsError) as e:
        check_codebook_size(s, 10)
    msg = str(e.value)
    assert "key 'n_centers': 500 words need at least as many training features" in msg
    assert 'use n_centers <= 120, or "auto" (12 here)' in msg
    assert check_codebook_size(settings(run_dir, n_centers=120), 10) == 120
    assert check_codebook_size(settings(run_dir, n_centers="auto"), 10) == 120
    assert check_codebook_size(settings(run_dir, n_centers=500, TRAIN_CENTROIDS=False),
                               10) == 120
    # step B's own check (the real sample) suggests the same
    code, out = step("B", run_dir, "n_centers=500")
    assert code == 2 and "use n_centers <= 120" in out


def test_step_a_refuses_before_reading_any_image(tmp_path):
    """A codebook the database cannot train is refused by step A before it extracts."""
    path = make_dataset(tmp_path / "d")
    err = refusal("A", path, "n_centers=100000")
    assert "key 'n_centers': 100000 words" in str(err) and "use n_centers <=" in str(err)
    assert not list((tmp_path / "d").rglob("*.lmdb"))
