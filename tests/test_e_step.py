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
    assert set(res["easy"]) >= {"map", "mp@1", "mp@5", "mp@10", "per_query"}
    assert (tmp_path / "run" / "bow" / "report" / "index.html").is_file()
