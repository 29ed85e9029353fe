"""Determinism: the whole pipeline (A -> E, with spatial re-ranking and local query
expansion) run twice with the same settings and seed on a generated demo set gives
byte-identical ranking lists, scores, map.txt — and the same stores, models and inverted
file by content. The first run is in this process, the second in a fresh interpreter, so
nothing (RNG state, caches, thread pools) carries over from one to the other."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers_pipeline import (
    files_of,
    run_outputs,
    run_pipeline,
    run_pipeline_fresh,
    settings_dict,
    write_json,
)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    from datasets.demo import generate

    root = tmp_path_factory.mktemp("det")
    gt = generate(root / "demo", seed=3, n_objects=3, views_per_object=2, n_distractors=3,
                  image_size=(64, 80))
    for run in ("run1", "run2"):
        write_json(root / f"{run}.json", settings_dict(
            path_images="demo/images", path_queries="demo/queries",
            path_gt=str(gt.relative_to(root)), path_output=run, seed=7, n_centers=16,
            pca_dim=12, new_dim=[8, 6], kmeans_iter=5, rerank=True, top=10,
            query_expansion="lqe", qe_top=2, augmentation=1))
    run_pipeline(root / "run1.json")
    p = run_pipeline_fresh(root / "run2.json")
    assert p.returncode == 0, p.stderr[-3000:]
    return root, root / "run1", root / "run2"


def test_rankings_and_map_are_byte_identical(two_runs):
    _, r1, r2 = two_runs
    a, b = files_of(r1 / "bow"), files_of(r2 / "bow")
    lists = [k for k in a if k.startswith("lists/")]
    assert len(lists) == 3
    for k in [*lists, "queries.txt", "scores.npy", "map.txt", "localisations.json"]:
        assert k in a and k in b, k
        assert a[k] == b[k], f"bow/{k} differs between two runs with the same seed"


def test_stores_models_and_index_are_identical(two_runs):
    root, r1, r2 = two_runs
    a, b = run_outputs(r1, [r1, root]), run_outputs(r2, [r2, root])
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == b[k], f"{k} differs between two runs with the same seed"
