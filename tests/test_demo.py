"""The generated demo set: layout, ground truth, junk rule, determinism, idempotence,
atomicity, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import datasets.demo as demo
from lib.errors import UserError
from lib.groundtruth.loader import read_generic_json

REPO = Path(__file__).resolve().parent.parent
SMALL = {"n_objects": 4, "views_per_object": 2, "n_distractors": 4, "image_size": (96, 128)}


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    demo.generate(out, seed=3, **SMALL)
    return out


def test_layout_and_ground_truth(small_set: Path) -> None:
    gt_path = small_set / demo.GT_FILE
    gt = read_generic_json(gt_path, small_set / "images", "demo")
    raw = json.loads(gt_path.read_text())
    n_obj, views = SMALL["n_objects"], SMALL["views_per_object"]
    assert len(gt.queries) == n_obj
    info = json.loads((small_set / demo.PARAMS_FILE).read_text())["images"]
    n_extra = sum(1 for v in info.values() if v["kind"] == "junk")
    assert len(gt.db_ids) == n_obj * views + n_extra + SMALL["n_distractors"]
    assert sorted(p.stem for p in (small_set / "images").glob("*.jpg")) == sorted(gt.db_ids)
    assert sorted(p.stem for p in (small_set / "queries").glob("*.jpg")) == \
        sorted(q.image for q in gt.queries)
    seen: set[str] = set()
    orientations = set()
    for k, (q, g) in enumerate(zip(gt.queries, raw["gnd"])):
        judged = q.positives | q.junk
        # every view of object k is judged for query k, nothing else is
        views_of_k = {n for n, v in info.items() if v["object"] == k and v["kind"] != "query"}
        assert judged == views_of_k
        assert len(q.positives) >= 1
        assert not (judged & seen)  # an image belongs to one object only
        seen |= judged
        with Image.open(small_set / "queries" / f"{q.image}.jpg") as im:
            w, h = im.size
        x1, y1, x2, y2 = q.bbox
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert (x2 - x1) * (y2 - y1) > 0.05 * w * h  # the object is a real part of the query
        assert g["ok"] == sorted(g["ok"])
    for name in gt.db_ids:
        with Image.open(small_set / "images" / f"{name}.jpg") as im:
            orientations.add(im.height > im.width)
            assert sorted(im.size) == sorted(SMALL["image_size"])
    assert orientations == {True, False}  # mixed portrait and landscape
    distractors = [n for n, v in info.items() if v["kind"] in ("clutter", "other")]
    assert len(distractors) == SMALL["n_distractors"] and not set(distractors) & seen


def test_junk_rule_matches_recorded_measurements(small_set: Path) -> None:
    raw = json.loads((small_set / demo.GT_FILE).read_text())
    info = json.loads((small_set / demo.PARAMS_FILE).read_text())["images"]
    for g in raw["gnd"]:
        for i in g["ok"]:
            v = info[raw["imlist"][i]]
            assert v["visible"] >= demo.JUNK_MIN_VISIBLE and v["area"] >= demo.JUNK_MIN_AREA
        for i in g["junk"]:
            v = info[raw["imlist"][i]]
            assert v["visible"] < demo.JUNK_MIN_VISIBLE or v["area"] < demo.JUNK_MIN_AREA


def test_deterministic_for_a_seed(small_set: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    demo.generate(again, seed=3, **SMALL)
    assert _digest(again) == _digest(small_set)  # byte-identical, every file
    other = tmp_path / "other"
    demo.generate(other, seed=4, **SMALL)
    assert _digest(other)["images/" + sorted(p.name for p in (other / "images").iterdir())[0]] \
        != _digest(small_set)["images/" + sorted(p.name for p in
                                                 (small_set / "images").iterdir())[0]]


def test_idempotent_and_regenerates_on_new_parameters(tmp_path: Path) -> None:
    out = tmp_path / "d"
    params = {**SMALL, "n_objects": 2, "n_distractors": 1}
    gt = demo.generate(out, seed=0, **params)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert demo.generate(out, seed=0, **params) == gt
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    demo.generate(out, seed=0, **{**params, "n_distractors": 3})
    raw = json.loads(gt.read_text())
    assert sum(1 for v in json.loads((out / demo.PARAMS_FILE).read_text())["images"].values()
               if v["kind"] in ("clutter", "other")) == 3
    assert len(list((out / "images").iterdir())) == len(raw["imlist"])


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a demo set"):
        demo.generate(out, seed=0, **SMALL)
    assert (out / "precious.txt").read_text() == "keep me"


def test_interrupted_generation_leaves_the_old_set(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "d"
    params = {**SMALL, "n_objects": 2, "n_distractors": 1}
    demo.generate(out, seed=0, **params)
    old = _digest(out)
    real = demo._render
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(demo, "_render", failing)
    with pytest.raises(KeyboardInterrupt):
        demo.generate(out, seed=1, **params)
    assert _digest(out) == old  # the complete old set, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary left behind
    fresh = tmp_path / "fresh"
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        demo.generate(fresh, seed=1, **params)
    assert not fresh.exists()


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, str(REPO / "datasets" / "demo.py"), "--out", str(out),
           "--objects", "2", "--views", "1", "--distractors", "1", "--size", "64", "80", "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "generated" in r.stdout and "2 queries" in r.stdout
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "up to date" in r.stdout
    r = subprocess.run([*cmd[:2], "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--out" in r.stdout and "junk" in r.stdout
    bad = [*cmd[:4], "--size", "10", "10"]
    r = subprocess.run(bad, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "image_size" in r.stderr


def test_settings_file_points_at_the_generated_set(small_set: Path, tmp_path: Path) -> None:
    from lib.settings import load_settings

    data = tmp_path / "data"
    data.mkdir()
    (data / "demo").symlink_to(small_set, target_is_directory=True)
    s = load_settings(REPO / "settings" / "demo.json", data_root=data, runs_root=tmp_path)
    from lib.groundtruth.loader import load_ground_truth

    gt = load_ground_truth(s)
    assert len(gt.queries) == SMALL["n_objects"] and all(q.bbox for q in gt.queries)
    assert s.gt_format == "generic" and s.network == "efficientnet_lite0"
