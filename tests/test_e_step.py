"""Step E end to end (its entry point, lib/evaluation/step.py): map.txt, results.json, the
summary line, relative --ranking names, and errors that name the list file and line with
exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.errors import UserError
from lib.evaluation.metrics import average_precision
from lib.evaluation.step import evaluate_run
from lib.groundtruth.loader import load_ground_truth
from lib.search.rankings import rank_scores, write_ranking_folder
from lib.settings import load_settings

FIX = Path(__file__).resolve().parent / "fixtures"

OX_IMAGES = ["all_souls_000013", "all_souls_000026", "all_souls_000091", "all_souls_000051",
             "all_souls_000183", "radcliffe_camera_000519", "radcliffe_camera_000095",
             "magdalen_000001", "magdalen_000002"]


def run_e(settings: Path, ranking: str | None = None) -> tuple[int, str, str]:
    """Step E on ``settings``: (exit code, what the command line prints on stdout: the
    summary line, on stderr: ``error: <message>`` when it refuses)."""
    try:
        res = evaluate_run(load_settings(settings), ranking=ranking)
    except UserError as e:
        assert "\n" not in str(e)  # one line
        return e.exit_code, "", f"error: {e}\n"
    assert res.step == "E"
    assert res.counts["map"] == json.loads(res.outputs[1].read_text())["map"]
    return 0, res.summary + "\n", ""


def _oxford(tmp_path: Path, folder: str = "bow") -> tuple[Path, list[str], np.ndarray]:
    imgs = tmp_path / "images"
    imgs.mkdir()
    for n in OX_IMAGES:
        (imgs / f"{n}.jpg").touch()
    s = tmp_path / "s.json"
    s.write_text(json.dumps({"dataset": "ox", "gt_format": "oxford", "path_images": "images",
                             "path_gt": str(FIX / "oxford_gt"), "path_output": "run",
                             "report": False}))
    gt = load_ground_truth(load_settings(s))
    rng = np.random.default_rng(1)
    scores = rng.random((len(gt.queries), len(gt.db_ids))).astype(np.float32)
    names = [q.name for q in gt.queries]
    write_ranking_folder(tmp_path / "run" / folder, names, gt.db_ids, scores,
                         rank_scores(scores), {"settings": {"masking": 1, "n_centers": 7}})
    return s, names, scores


def test_e_oxford(tmp_path: Path) -> None:
    s, names, scores = _oxford(tmp_path)
    code, out, err = run_e(s)
    assert code == 0, err
    folder = tmp_path / "run" / "bow"
    gt = load_ground_truth(load_settings(s))
    expect = []
    for i, q in enumerate(gt.queries):
        ranked = [gt.db_ids[k] for k in np.argsort(-scores[i], kind="stable")]
        expect.append(average_precision(ranked, q.positives, q.junk))
    lines = (folder / "map.txt").read_text().splitlines()
    assert len(lines) == 3
    np.testing.assert_allclose([float(x) for x in lines], expect, atol=1e-12)
    res = json.loads((folder / "results.json").read_text())
    assert res["map"] == pytest.approx(np.mean(expect)) and res["n_queries"] == 3
    assert list(res["per_query"]) == names
    assert set(res["per_landmark"]) == {"all_souls", "radcliffe_camera"}
    assert res["settings"] == {"masking": 1, "n_centers": 7} and res["ranking"] == "bow"
    assert res["queries_without_positives"] == []
    # Oxford queries have boxes and ranking.json says masking 1: every query used its box
    assert res["search_mode"]["masking"] == 1
    assert res["search_mode"]["masking_from"] == "ranking.json"
    assert res["search_mode"]["per_query"] == {
        n: {"mode": "box", "why": "box, masking=1"} for n in names}
    assert re.fullmatch(rf"E: mAP {np.mean(expect):.4f} over 3 queries \(bow\) -> "
                        rf"{re.escape(str(folder / 'map.txt'))}\n", out)


def test_e_relative_ranking_name(tmp_path: Path) -> None:
    s, _, _ = _oxford(tmp_path, folder="pooling_sum")
    code, out, _ = run_e(s, "pooling_sum")
    assert code == 0 and "(pooling_sum)" in out
    assert (tmp_path / "run" / "pooling_sum" / "results.json").is_file()
    code, _, err = run_e(s)  # default bow: absent
    assert code == 2 and "ranking folder not found" in err


def test_e_errors_name_file_and_line(tmp_path: Path) -> None:
    s, names, _ = _oxford(tmp_path)
    lst = tmp_path / "run" / "bow" / "lists" / f"{names[1]}.txt"
    lines = lst.read_text().splitlines()
    lst.write_text("\n".join([*lines[:3], lines[0], *lines[3:]]) + "\n")
    code, out, err = run_e(s)
    assert code == 2 and out == ""
    assert re.search(r"all_souls_2\.txt, line 4 \(query 'all_souls_2'\): image id '.+' "
                     "listed twice", err)
    assert not (tmp_path / "run" / "bow" / "map.txt").exists()
    lst.unlink()
    code, _, err = run_e(s)
    assert code == 2 and "ranked list of query 'all_souls_2' is missing" in err


def test_e_revisited_generic_with_report(tmp_path: Path) -> None:
    imgs = tmp_path / "images"
    imgs.mkdir()
    db = [f"im{i}" for i in range(6)]
    rng = np.random.default_rng(0)
    for n in [*db, "qa", "qb"]:
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(imgs / f"{n}.jpg")
    gnd = {"imlist": db, "qimlist": ["qa", "qb"],
           "gnd": [{"bbx": [1, 1, 20, 20], "easy": [0], "hard": [2], "junk": [1]},
                   {"bbx": [0, 0, 10, 10], "easy": [3], "hard": [], "junk": []}]}
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    s = tmp_path / "s.json"
    s.write_text(json.dumps({"dataset": "tiny", "gt_format": "generic", "path_images": "images",
                             "path_gt": "gnd.json", "path_output": "run", "report": True}))
    scores = rng.random((2, 6)).astype(np.float32)
    write_ranking_folder(tmp_path / "run" / "bow", ["qa", "qb"], db, scores,
                         rank_scores(scores), {"settings": {}})
    code, out, err = run_e(s)
    assert code == 0, err
    assert re.search(r"over 2 queries \(bow\) \[E \d\.\d{4} M \d\.\d{4} H \d\.\d{4}\]", out)
    res = json.loads((tmp_path / "run" / "bow" / "results.json").read_text())
    assert res["hard"]["n_queries"] == 1 and res["medium"]["map"] == res["map"]
    assert res["hard"]["queries_without_positives"] == ["qb"]
    assert set(res["easy"]) >= {"map", "mp@1", "mp@5", "mp@10", "per_query"}
    assert (tmp_path / "run" / "bow" / "report" / "index.html").is_file()


def _generic(tmp_path: Path, gnd: dict, masking: int | None = None,
             report: bool = False) -> Path:
    """A generic ground truth over six images, a ranking folder from random scores (its
    ranking.json records ``masking`` when given), and the settings file."""
    imgs = tmp_path / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for n in [*gnd["imlist"], *gnd["qimlist"]]:
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(imgs / f"{n}.jpg")
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    s = tmp_path / "s.json"
    s.write_text(json.dumps({"dataset": "tiny", "gt_format": "generic", "path_images": "images",
                             "path_gt": "gnd.json", "path_output": "run", "report": report}))
    scores = rng.random((len(gnd["qimlist"]), len(gnd["imlist"]))).astype(np.float32)
    meta = {"settings": {} if masking is None else {"masking": masking}}
    write_ranking_folder(tmp_path / "run" / "bow", gnd["qimlist"], gnd["imlist"], scores,
                         rank_scores(scores), meta)
    return s


def test_e_query_without_positives(tmp_path: Path, caplog) -> None:
    db = [f"im{i}" for i in range(6)]
    s = _generic(tmp_path, {"imlist": db, "qimlist": ["qa", "qb", "qc"],
                            "gnd": [{"bbx": [1, 1, 20, 20], "ok": [0, 3], "junk": [1]},
                                    {"bbx": [0, 0, 10, 10], "ok": [], "junk": [2]},
                                    {"bbx": [0, 0, 10, 10], "ok": [5], "junk": []}]},
                 report=True)
    with caplog.at_level("WARNING"):
        code, out, err = run_e(s)
    assert code == 0, err
    folder = tmp_path / "run" / "bow"
    res = json.loads((folder / "results.json").read_text())
    assert res["queries_without_positives"] == ["qb"] and res["per_query"]["qb"] is None
    assert res["n_queries"] == 2 and res["n_queries_listed"] == 3
    assert "over 2 queries" in out
    assert any("qb" in r.getMessage() and "no positives" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    # map.txt: numbers only, the evaluated queries in queries.txt order; its mean is the mAP
    text = (folder / "map.txt").read_text()
    assert "nan" not in text.lower()
    lines = [float(x) for x in text.splitlines()]
    assert lines == [res["per_query"]["qa"], res["per_query"]["qc"]]
    assert np.mean(lines) == pytest.approx(res["map"])
    page = (folder / "report" / "index.html").read_text()
    assert "AP n/a (no positives)" in page and "Left out of the mean (no positives)" in page


def test_e_search_mode_per_query(tmp_path: Path, caplog) -> None:
    db = [f"im{i}" for i in range(6)]
    gnd = {"imlist": db, "qimlist": ["qa", "qb"],
           "gnd": [{"bbx": [1, 1, 20, 20], "ok": [0]}, {"ok": [3]}]}  # qb: no box
    s = _generic(tmp_path, gnd, masking=1, report=True)
    with caplog.at_level("WARNING"):
        code, _, err = run_e(s)
    assert code == 0, err
    folder = tmp_path / "run" / "bow"
    res = json.loads((folder / "results.json").read_text())
    assert res["search_mode"] == {
        "masking": 1, "masking_from": "ranking.json",
        "per_query": {"qa": {"mode": "box", "why": "box, masking=1"},
                      "qb": {"mode": "whole image", "why": "no box in the ground truth"}}}
    assert any("masking=1" in r.getMessage() and "qb" in r.getMessage()
               and "whole image" in r.getMessage() for r in caplog.records)
    page = (folder / "report" / "index.html").read_text()
    assert "whole image</b> (no box in the ground truth)" in page
    # lists made elsewhere (no masking in ranking.json): the settings' masking
    write_ranking_folder(folder, ["qa", "qb"], db, np.zeros((2, 6), np.float32),
                         rank_scores(np.zeros((2, 6), np.float32)), {})
    s.write_text(json.dumps({**json.loads(s.read_text()), "masking": 0}))
    code, _, err = run_e(s)
    assert code == 0, err
    res = json.loads((folder / "results.json").read_text())
    assert res["search_mode"]["masking_from"] == "settings"
    assert {m["why"] for m in res["search_mode"]["per_query"].values()} == {"masking=0"}


@pytest.mark.parametrize("masking", [0, 1, 2, 3])
@pytest.mark.parametrize("bbox", [(4.0, 4.0, 30.0, 30.0), None])
def test_search_mode_agrees_with_step_d(masking: int, bbox) -> None:
    """E's search_mode is D's decision: the BoW query encoder keeps no box cells and the
    mask weights are None (every word) exactly when E says "whole image"."""
    from lib.evaluation.step import search_mode
    from lib.groundtruth.common import Query
    from lib.search.augmentation import variants_for
    from lib.search.masks import query_weights
    from lib.search.query_encoding import QueryEncoder

    q = Query("q", "q", bbox, frozenset({"a"}))
    whole = search_mode(masking, q)["mode"] == "whole image"
    hw, map_hw = (40, 40), (5, 5)
    assert (query_weights(masking, bbox, hw, map_hw) is None) == whole
    assert (query_weights(masking, bbox, hw, map_hw, pooling=True) is None) == whole
    enc = QueryEncoder.__new__(QueryEncoder)  # only encode()'s decision, no models
    enc.s = {"masking": masking, "query_weighting": "none", "kernel": "bow"}
    enc.variants = list(variants_for(0))
    enc.n_words = 8
    enc.scale_encoders, enc._parent = [], None  # one scale
    words = np.arange(25, dtype=np.uint16).reshape(map_hw) % 8
    enc.words = lambda image_id: ([words], hw)  # type: ignore[method-assign]
    e = enc.encode(q)
    assert (e.cells is None) == whole and (e.weights[0] is None) == whole
