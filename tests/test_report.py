"""The HTML report and its charts: content checked with html.parser, and the page rendered
in a real headless browser (Debian's chromium) when one is installed."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lib.evaluation.plots import PALETTE, Series, bar_chart, line_chart, nice_ticks
from lib.evaluation.report import per_query_ap, select_queries, write_report
from lib.groundtruth.loader import load_ground_truth
from lib.settings import load_settings

POS, NEG, JUNK = (26, 158, 26), (214, 39, 40), (158, 158, 158)


def _rankings(queries, lists, localisations):
    """A lib.search.rankings.Rankings when that module exists, else the same fields."""
    fields = {"queries": queries, "lists": lists, "meta": {}, "localisations": localisations}
    try:
        from lib.search.rankings import Rankings
    except ImportError:
        return SimpleNamespace(**fields)
    return Rankings(**fields)


@pytest.fixture()
def setup(tmp_path: Path):
    """Six database images (mixed orientation), two queries with boxes, a generic gt."""
    rng = np.random.default_rng(0)
    img_dir, q_dir = tmp_path / "images", tmp_path / "queries"
    img_dir.mkdir()
    q_dir.mkdir()
    db = [f"im{i}" for i in range(6)]
    for i, name in enumerate(db):
        h, w = (80, 60) if i % 2 else (60, 80)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            img_dir / f"{name}.jpg")
    for name in ("qa", "sub/qb"):
        (q_dir / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
            q_dir / f"{name}.png")
    gnd = {"imlist": db, "qimlist": ["qa", "sub/qb"],
           "gnd": [{"bbx": [10, 5, 50, 40], "ok": [0, 2], "junk": [1]},
                   {"bbx": [0, 0, 40, 30], "ok": [3], "junk": []}]}
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    (tmp_path / "s.json").write_text(json.dumps({
        "dataset": "tiny", "gt_format": "generic", "path_images": str(img_dir),
        "path_queries": str(q_dir), "path_gt": str(tmp_path / "gnd.json"),
        "path_output": str(tmp_path / "run"), "report_top_k": 4}))
    s = load_settings(tmp_path / "s.json")
    gt = load_ground_truth(s)
    lists = {"qa": ["im0", "im1", "im4", "im2", "im3", "im5"],
             "sub/qb": ["im5", "im3", "im0", "im1", "im2", "im4"]}
    locs = {"qa": [{"image": "im0", "rank": 0, "score": 0.9, "box": [8, 4, 40, 30]},
                   {"image": "im4", "rank": 2, "score": 0.5, "box": [0, 0, 30, 30]}]}
    return s, gt, _rankings(["qa", "sub/qb"], lists, locs), tmp_path


class _Page(HTMLParser):
    """Collects query sections, figures (class, caption), boxes and referenced files."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[dict] = []
        self.srcs: list[str] = []
        self.summary_text = ""
        self._in = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append({"query": a["data-query"], "figures": [], "text": ""})
        elif tag == "figure" and self.sections:
            self.sections[-1]["figures"].append({"cls": a["class"], "boxes": [], "cap": ""})
        elif tag == "div" and "box" in a.get("class", "").split() and self.sections:
            self.sections[-1]["figures"][-1]["boxes"].append(a["style"])
        elif tag == "img":
            self.srcs.append(a["src"])
        elif tag == "table" and a.get("id") == "summary":
            self._in = "summary"
        elif tag == "figcaption":
            self._in = "cap"

    def handle_endtag(self, tag):
        if tag in ("table", "figcaption"):
            self._in = None

    def handle_data(self, data):
        if self._in == "summary":
            self.summary_text += data + " "
        if self.sections:
            self.sections[-1]["text"] += data
            if self._in == "cap":
                self.sections[-1]["figures"][-1]["cap"] += data


def _parse(index: Path) -> _Page:
    p = _Page()
    p.feed(index.read_text(encoding="utf-8"))
    return p


def _oxford_ap(ranked, pos, junk) -> float:
    """Independent loop version of the Oxford compute_ap trapezoid rule."""
    hits, ap, old_r, old_p, j = 0, 0.0, 0.0, 1.0, 0
    for i in ranked:
        if i in junk:
            continue
        hits += i in pos
        r, p = hits / len(pos), hits / (j + 1)
        ap += (r - old_r) * (old_p + p) / 2
        old_r, old_p, j = r, p, j + 1
    return ap


def test_report_content(setup) -> None:
    s, gt, rk, tmp = setup
    results = {"map": 0.625, "per_query": {"qa": 0.75, "sub/qb": 0.5},
               "per_landmark": {"x": 0.625}}
    index = write_report(tmp / "run" / "bow", gt, s, results, rk)
    assert index == tmp / "run" / "bow" / "report" / "index.html"
    page = _parse(index)
    assert [sec["query"] for sec in page.sections] == ["qa", "sub/qb"]
    assert "AP 0.7500" in page.sections[0]["text"] and "AP 0.5000" in page.sections[1]["text"]
    assert "0.6250" in page.summary_text and "per_landmark.x" in page.summary_text
    qa = page.sections[0]["figures"]
    assert qa[0]["cls"] == "query" and len(qa[0]["boxes"]) == 1  # the query box
    # top-4 of qa: im0 positive, im1 junk, im4 negative, im2 positive
    assert [f["cls"] for f in qa[1:]] == ["pos", "junk", "neg", "pos"]
    assert [len(f["boxes"]) for f in qa[1:]] == [1, 0, 1, 0]  # localisations where given
    assert "#1 im0" in qa[1]["cap"] and "score 0.900" in qa[1]["cap"]
    # im0 is 80x60 (landscape): box [8, 4, 40, 30] -> 10% / 6.67% / 40% / 43.33%
    assert qa[1]["boxes"][0] == "left:10.00%;top:6.67%;width:40.00%;height:43.33%"
    qb = page.sections[1]["figures"]
    assert [f["cls"] for f in qb[1:]] == ["neg", "pos", "neg", "neg"]
    report = index.parent
    for src in page.srcs:
        assert (report / src).is_file(), src
    for png in ("ap_per_query.png", "pr_curves.png"):
        assert png in page.srcs
        with Image.open(report / png) as im:
            im.verify()
        with Image.open(report / png) as im:
            assert im.format == "PNG" and np.asarray(im.convert("L")).std() > 5


def test_ap_computed_when_results_lack_it(setup) -> None:
    s, gt, rk, tmp = setup
    index = write_report(tmp / "run" / "bow", gt, s, {}, rk)
    text = {sec["query"]: sec["text"] for sec in _parse(index).sections}
    for q in gt.queries:
        ap = _oxford_ap(rk.lists[q.name], q.positives, q.junk)
        assert f"AP {ap:.4f}" in text[q.name]
    # qa: positives at junk-free ranks 1 and 3 of 2 -> 0.5 + 0.5 * (0.5 + 2/3) / 2
    assert math.isclose(_oxford_ap(rk.lists["qa"], gt.query("qa").positives,
                                   gt.query("qa").junk), 0.5 + 0.5 * (0.5 + 2 / 3) / 2)


def test_worst_and_best_when_too_many_queries(setup) -> None:
    s, gt, rk, tmp = setup
    index = write_report(tmp / "run" / "bow", gt, s.replace(report_max_queries=1),
                         {"per_query": {"qa": 0.75, "sub/qb": 0.5}}, rk)
    page = _parse(index)
    assert [sec["query"] for sec in page.sections] == ["sub/qb"]  # the worst one
    assert "1 of 2 queries shown" in index.read_text()
    aps = {"a": 0.5, "b": 0.1, "c": 0.9, "d": 0.1, "e": float("nan"), "f": 0.7}
    secs = select_queries(list(aps), aps, 4)
    assert secs[0][1] == ["b", "d"] and secs[1][1] == ["c", "f"]
    assert select_queries(list(aps), aps, 6) == [("All queries", list(aps))]


def test_missing_image_gets_a_placeholder(setup, caplog) -> None:
    s, gt, rk, tmp = setup
    (tmp / "images" / "im5.jpg").unlink()
    index = write_report(tmp / "run" / "bow", gt, s, {}, rk)
    page = _parse(index)
    assert all((index.parent / src).is_file() for src in page.srcs)
    assert any("im5" in r.getMessage() for r in caplog.records)


def test_trecvid_is_judged_by_shot(setup) -> None:
    s, _, _, tmp = setup
    from lib.groundtruth.common import GroundTruth, Query

    shots = {"im0": "s1", "im1": "s1", "im2": "s2", "im3": "s3", "im4": "s4", "im5": "s4"}
    gt = GroundTruth("tv", "trecvid", [f"im{i}" for i in range(6)],
                     [Query("qa", "qa", (10, 5, 50, 40))], shots=shots,
                     relevant_shots={"qa": frozenset({"s2", "s4"})})
    rk = _rankings(["qa"], {"qa": ["im0", "im2", "im1", "im5", "im3", "im4"]}, None)
    page = _parse(write_report(tmp / "run" / "bow", gt, s, {}, rk))
    assert [f["cls"] for f in page.sections[0]["figures"][1:]] == ["neg", "pos", "neg", "pos"]
    # shot list s1, s2, s4, s3: relevant at ranks 2 and 3 -> (1/2 + 2/3) / 2
    assert f"AP {(1 / 2 + 2 / 3) / 2:.4f}" in page.sections[0]["text"]


def test_per_query_ap_formats() -> None:
    names = ["a", "b"]
    assert per_query_ap({"per_query": {"a": 0.5, "b": {"ap": 0.25}}}, names) == \
        {"a": 0.5, "b": 0.25}
    assert per_query_ap({"aps": [0.1, 0.2]}, names) == {"a": 0.1, "b": 0.2}
    assert per_query_ap({"aps": [0.1]}, names) is None
    assert per_query_ap({"medium": {"map": 0.3, "per_query": [0.2, 0.4]}}, names) == \
        {"a": 0.2, "b": 0.4}
    assert math.isnan(per_query_ap({"per_query": {"a": None, "b": 1.0}}, names)["a"])


def test_plots(tmp_path: Path) -> None:
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 7, 4) == [0, 2, 4, 6]
    bar = bar_chart([0.9, 0.5, 0.1], tmp_path / "b.png", title="t", labels=["x", "y", "z"],
                    hline=0.5, hline_label="mean", size=(300, 200))
    r = np.linspace(0, 1, 20)
    line = line_chart([Series(r, 1 - r, label="l"), Series([0.5], [0.5])], tmp_path / "l.png",
                      size=(320, 240))
    for path, size in ((bar, (300, 200)), (line, (320, 240))):
        with Image.open(path) as im:
            assert im.size == size
            a = np.asarray(im.convert("RGB")).astype(int)
        assert a.std() > 5
        # the bars / the first line are painted in the first palette colour
        assert (np.abs(a - PALETTE[0]).sum(-1) < 30).sum() > 50


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium")
                                        .exists() else None)


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp / 'chrome-profile'}", *args],
        capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(apt-get install chromium) - headless render check skipped")
def test_renders_in_headless_chromium(setup) -> None:
    s, gt, rk, tmp = setup
    index = write_report(tmp / "run" / "bow", gt, s, {"map": 0.625}, rk)
    shot = tmp / "shot.png"
    r = _chromium(tmp, f"--screenshot={shot}", "--window-size=1200,2000", index.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        a = np.asarray(im.convert("RGB")).astype(int)
    assert a.std() > 10  # not a blank page
    for colour in (POS, NEG, JUNK):  # the result frames were painted
        assert (np.abs(a - colour).sum(-1) < 30).sum() > 200, colour
    r = _chromium(tmp, "--dump-dom", index.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "BLCF report: tiny" in r.stdout and 'data-query="sub/qb"' in r.stdout
    assert "AP 0.7917" in r.stdout
