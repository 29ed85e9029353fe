"""The HTML report: content checked with html.parser (sections, anchors, index order,
chart links, precision-recall geometry, summary labels, legend, the "why did this fail"
panel, scores, search mode), and the page rendered in a real headless browser (Debian's
chromium) when one is installed: colours painted, labels not overlapping, the order
toggle working."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lib.evaluation.charts import PAD, ap_chart, nice_ticks, pr_chart, pr_points
from lib.evaluation.metrics import precision_recall
from lib.evaluation.report import (
    anchors,
    first_negative_above_positive,
    per_query_ap,
    select_queries,
    worst_first,
    write_report,
)
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
    """Six database images (mixed orientation), two queries with boxes, a generic gt,
    and a scores.npy consistent with the lists in the ranking folder."""
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
    scores = np.zeros((2, 6), np.float32)
    for qi, q in enumerate(("qa", "sub/qb")):
        for rank, i in enumerate(lists[q]):
            scores[qi, db.index(i)] = 0.9 - 0.1 * rank
    (tmp_path / "run" / "bow").mkdir(parents=True)
    np.save(tmp_path / "run" / "bow" / "scores.npy", scores)
    return s, gt, _rankings(["qa", "sub/qb"], lists, locs), tmp_path


_CLOSES = {"table": ("summary", "index"), "p": ("legend",), "figcaption": ("cap",)}


class _Page(HTMLParser):
    """Collects query sections (with the figures of their result row and of their
    failure panel), index rows, summary rows, legend, chart links and referenced files."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[dict] = []
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.summary: list[list[str]] = []
        self.index_rows: list[dict] = []
        self.bar_links: list[tuple[str, str]] = []  # (href, data-query)
        self.curve_links: list[str] = []
        self.legend = ""
        self.scripts: list[dict] = []
        self.ids: list[str] = []
        self._stack: list[str] = []  # open containers we care about
        self._href: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "section":
            self.sections.append({"query": a["data-query"], "id": a["id"], "figures": [],
                                  "aid": [], "text": ""})
        elif tag == "div" and "aid" in cls:
            self._stack.append("aid")
        elif tag == "figure" and self.sections:
            where = "aid" if "aid" in self._stack else "figures"
            self.sections[-1][where].append({"cls": a["class"], "boxes": [], "cap": ""})
        elif tag == "div" and "box" in cls and self.sections:
            where = "aid" if "aid" in self._stack else "figures"
            self.sections[-1][where][-1]["boxes"].append((cls, a["style"]))
        elif tag == "img":
            self.srcs.append(a["src"])
        elif tag == "a":
            self.hrefs.append(a.get("href", ""))
            self._href = a.get("href")
            if "bar-link" in cls:
                self.bar_links.append((a["href"], ""))
            elif "curve-link" in cls:
                self.curve_links.append(a["href"])
        elif tag == "rect" and "bar" in cls and self.bar_links and self._href:
            self.bar_links[-1] = (self._href, a["data-query"])
        elif tag == "table" and a.get("id") in ("summary", "index"):
            self._stack.append(a["id"])
        elif tag == "tr" and self._stack and self._stack[-1] in ("summary", "index"):
            if self._stack[-1] == "summary":
                self.summary.append([])
            elif "data-name" in a:
                self.index_rows.append({"name": a["data-name"], "worst": int(a["data-worst"]),
                                        "cells": []})
        elif tag in ("td", "th") and self._stack and self._stack[-1] in ("summary", "index"):
            self._cell = []
        elif tag == "p" and a.get("id") == "legend":
            self._stack.append("legend")
        elif tag == "figcaption":
            self._stack.append("cap")
        elif tag == "script":
            self.scripts.append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            text = " ".join("".join(self._cell).split())
            if self._stack[-1] == "summary":
                self.summary[-1].append(text)
            elif self.index_rows:
                self.index_rows[-1]["cells"].append(text)
            self._cell = None
        elif self._stack and self._stack[-1] in _CLOSES.get(tag, ()):
            self._stack.pop()
        elif tag == "a":
            self._href = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if "legend" in self._stack:
            self.legend += data
        if self.sections:
            self.sections[-1]["text"] += data
            if self._stack and self._stack[-1] == "cap":
                where = "aid" if "aid" in self._stack else "figures"
                self.sections[-1][where][-1]["cap"] += data + " "


def _parse(index: Path) -> _Page:
    """Parse the page; the failure panel's end is found by counting its nested divs."""
    text = index.read_text(encoding="utf-8")
    p = _Page()
    # the panel holds <div class="row"> and <div class="frame"> children: track depth
    depth = {"n": 0}
    start, end = p.handle_starttag, p.handle_endtag

    def on_start(tag, attrs):
        if tag == "div" and "aid" in p._stack:
            depth["n"] += 1
        start(tag, attrs)

    def on_end(tag):
        if tag == "div" and "aid" in p._stack:
            if depth["n"] == 0:
                p._stack.remove("aid")
                return
            depth["n"] -= 1
        end(tag)

    p.handle_starttag, p.handle_endtag = on_start, on_end  # type: ignore[method-assign]
    p.feed(text)
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


def _summary(page: _Page) -> dict[str, str]:
    return {row[0]: row[1] for row in page.summary}


def test_report_content(setup) -> None:
    s, gt, rk, tmp = setup
    results = {"map": 0.625, "per_query": {"qa": 0.75, "sub/qb": 0.5},
               "per_landmark": {"x": 0.625}}
    index = write_report(tmp / "run" / "bow", gt, s, results, rk)
    assert index == tmp / "run" / "bow" / "report" / "index.html"
    page = _parse(index)
    # one section per query, worst first, each with its own anchor
    assert [sec["query"] for sec in page.sections] == ["sub/qb", "qa"]
    assert [sec["id"] for sec in page.sections] == ["q-sub_qb", "q-qa"]
    assert len(set(page.ids)) == len(page.ids)  # ids are unique
    qb_sec, qa_sec = page.sections
    assert "AP 0.7500" in qa_sec["text"] and "AP 0.5000" in qb_sec["text"]
    summary = _summary(page)
    assert summary["mAP"] == "0.6250"
    assert "per_landmark" not in index.read_text()  # raw keys never reach the page
    assert 'id="per-landmark"' in index.read_text()
    qa = qa_sec["figures"]
    assert qa[0]["cls"] == "query" and len(qa[0]["boxes"]) == 1  # the query box
    # top-4 of qa: im0 positive, im1 junk, im4 negative, im2 positive
    assert [f["cls"] for f in qa[1:]] == ["pos", "junk", "neg", "pos"]
    assert [len(f["boxes"]) for f in qa[1:]] == [1, 0, 1, 0]  # localisations where given
    # scores come from scores.npy, with or without re-ranking: 0.9, 0.8, ... by rank
    assert "#1 im0" in qa[1]["cap"] and "score 0.9000" in qa[1]["cap"]
    assert "score 0.6000" in qa[4]["cap"]
    # im0 is 80x60 (landscape): box [8, 4, 40, 30] -> 10% / 6.67% / 40% / 43.33%
    assert qa[1]["boxes"][0][1] == "left:10.00%;top:6.67%;width:40.00%;height:43.33%"
    qb = qb_sec["figures"]
    assert [f["cls"] for f in qb[1:]] == ["neg", "pos", "neg", "neg"]
    assert all("score" in f["cap"] for f in qb[1:])
    report = index.parent
    for src in page.srcs:
        assert (report / src).is_file(), src
    assert sorted(p.name for p in report.iterdir()) == ["index.html", "thumbs"]


def test_index_order_anchors_and_chart_links(setup) -> None:
    s, gt, rk, tmp = setup
    index = write_report(tmp / "run" / "bow", gt, s, {"per_query": {"qa": 0.75,
                                                                    "sub/qb": 0.5}}, rk)
    page = _parse(index)
    ids = set(page.ids)
    # the index: worst first, each row linking to its section
    assert [r["name"] for r in page.index_rows] == ["sub/qb", "qa"]
    assert [r["worst"] for r in page.index_rows] == [0, 1]
    assert [r["cells"][2] for r in page.index_rows] == ["0.5000", "0.7500"]
    # first positive at rank: qb's im3 is 2nd, qa's im0 is 1st
    assert [r["cells"][3] for r in page.index_rows] == ["2", "1"]
    assert "#q-sub_qb" in page.hrefs and "#q-qa" in page.hrefs
    # every bar of the AP chart links to its query's section, worst first
    assert page.bar_links == [("#q-sub_qb", "sub/qb"), ("#q-qa", "qa")]
    assert set(page.curve_links) == {"#q-sub_qb", "#q-qa"}
    for href in [h for h in page.hrefs if h.startswith("#")]:
        assert href[1:] in ids, href
    # self-contained: the toggle's script is inline, nothing is fetched from elsewhere
    assert 'id="order-toggle"' in index.read_text()
    assert page.scripts and all("src" not in a for a in page.scripts)
    assert not [h for h in page.hrefs + page.srcs if re.match(r"^(https?:)?//", h)]


def test_summary_has_human_labels_and_no_repeats(setup) -> None:
    s, gt, rk, tmp = setup
    from lib.evaluation.metrics import evaluate

    res = evaluate(gt, rk)
    res["ground_truth"] = {"gt_format": "generic", "path_gt": str(tmp / "gnd.json")}
    page = _parse(write_report(tmp / "run" / "bow", gt, s, res, rk))
    labels = [row[0] for row in page.summary]
    assert len(labels) == len(set(labels))
    for raw in ("n_queries", "n_queries_listed", "queries", "ground_truth.path_gt", "map"):
        assert raw not in labels
    summary = _summary(page)
    assert summary["Queries"] == "2 ranked, 2 evaluated"
    assert summary["Database images"] == "6"
    assert summary["Ground truth"] == f"{tmp / 'gnd.json'} (generic)"
    assert summary["Search"] == "masking 1: box for 2 queries (box, masking=1)"
    assert not any(v.count("_") and k == "Protocol" for k, v in summary.items())


def test_legend_lists_only_what_is_shown(setup) -> None:
    s, gt, rk, tmp = setup
    page = _parse(write_report(tmp / "run" / "bow", gt, s, {}, rk))
    assert all(w in page.legend for w in ("query", "positive", "negative", "junk",
                                          "query box", "spatial re-ranking"))
    # top 1 only and no localisations: qa's im0 (positive), qb's im5 (negative)
    bare = _rankings(rk.queries, rk.lists, None)
    page = _parse(write_report(tmp / "run" / "bow", gt, s.replace(report_top_k=1), {}, bare))
    assert "junk" not in page.legend and "re-ranking" not in page.legend
    assert "positive" in page.legend and "negative" in page.legend
    assert "query box" in page.legend
    shown = {f["cls"] for sec in page.sections for f in sec["figures"] + sec["aid"]}
    assert shown == {"query", "pos", "neg"}


def test_failure_panel_first_negative_above_first_positive(setup) -> None:
    s, gt, rk, tmp = setup
    page = _parse(write_report(tmp / "run" / "bow", gt, s.replace(report_top_k=1), {}, rk))
    by = {sec["query"]: sec for sec in page.sections}
    # qa starts with a positive: nothing outranks it, no panel
    assert by["qa"]["aid"] == []
    # qb: im5 (negative) at rank 1 above im3 (positive) at rank 2, beside the query,
    # even though rank 2 is past report_top_k
    aid = by["sub/qb"]["aid"]
    assert [f["cls"] for f in aid] == ["query", "neg", "pos"]
    assert "#1 im5" in aid[1]["cap"] and "first negative" in aid[1]["cap"]
    assert "#2 im3" in aid[2]["cap"] and "first positive" in aid[2]["cap"]
    assert "Why did this fail?" in by["sub/qb"]["text"]
    # the rule, junk skipped as in AP
    assert first_negative_above_positive(["junk", "pos", "neg"]) is None
    assert first_negative_above_positive(["junk", "neg", "junk", "pos"]) == (1, 3)
    assert first_negative_above_positive(["neg", "neg"]) == (0, None)  # never retrieved
    assert first_negative_above_positive([]) is None


def test_search_mode_shown_per_query(setup) -> None:
    s, gt, rk, tmp = setup
    page = _parse(write_report(tmp / "run" / "bow", gt, s.replace(masking=0), {}, rk))
    assert all("whole image" in r["cells"][4] and "masking=0" in r["cells"][4]
               for r in page.index_rows)
    assert all("search: whole image (masking=0)" in " ".join(sec["text"].split())
               for sec in page.sections)
    # the masking D used (ranking.json) wins over the settings
    rk.meta = {"settings": {"masking": 1}}
    page = _parse(write_report(tmp / "run" / "bow", gt, s.replace(masking=0), {}, rk))
    assert all(r["cells"][4] == "box (box, masking=1)" for r in page.index_rows)


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
    # the index still lists both; the one without a section has no link, nor its bar
    assert [r["name"] for r in page.index_rows] == ["sub/qb", "qa"]
    assert "#q-qa" not in page.hrefs and page.bar_links == [("#q-sub_qb", "sub/qb")]
    aps = {"a": 0.5, "b": 0.1, "c": 0.9, "d": 0.1, "e": float("nan"), "f": 0.7}
    assert worst_first(list(aps), aps) == ["b", "d", "a", "f", "c", "e"]
    assert select_queries(list(aps), aps, 4) == ["b", "d", "f", "c"]
    assert select_queries(list(aps), aps, 6) == ["b", "d", "a", "f", "c", "e"]
    assert anchors(["a/b", "a_b", "x y"]) == {"a/b": "q-a_b", "a_b": "q-a_b-2",
                                             "x y": "q-x_y"}


def test_scores_left_out_without_scores_file(setup) -> None:
    s, gt, rk, tmp = setup
    (tmp / "run" / "bow" / "scores.npy").unlink()
    page = _parse(write_report(tmp / "run" / "bow", gt, s, {}, rk))
    assert not any("score" in f["cap"] for sec in page.sections for f in sec["figures"])


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
    (tmp / "run" / "bow" / "scores.npy").unlink()  # two queries' scores: not this folder's
    page = _parse(write_report(tmp / "run" / "bow", gt, s, {}, rk))
    assert [f["cls"] for f in page.sections[0]["figures"][1:]] == ["neg", "pos", "neg", "pos"]
    # shot list s1, s2, s4, s3: relevant at ranks 2 and 3 -> (1/2 + 2/3) / 2
    assert f"AP {(1 / 2 + 2 / 3) / 2:.4f}" in page.sections[0]["text"]
    assert "2 relevant shots" in page.sections[0]["text"]


def test_per_query_ap_formats() -> None:
    names = ["a", "b"]
    assert per_query_ap({"per_query": {"a": 0.5, "b": {"ap": 0.25}}}, names) == \
        {"a": 0.5, "b": 0.25}
    assert per_query_ap({"aps": [0.1, 0.2]}, names) == {"a": 0.1, "b": 0.2}
    assert per_query_ap({"aps": [0.1]}, names) is None
    assert per_query_ap({"medium": {"map": 0.3, "per_query": [0.2, 0.4]}}, names) == \
        {"a": 0.2, "b": 0.4}
    assert math.isnan(per_query_ap({"per_query": {"a": None, "b": 1.0}}, names)["a"])


def test_pr_curve_starts_at_first_hit_and_clears_the_border() -> None:
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 7, 4) == [0, 2, 4, 6]
    # n, n, p, j, p: the first point is the first hit (recall 1/2, precision 1/3)
    r, p = precision_recall(["n1", "n2", "p1", "j1", "p2"], {"p1", "p2"}, {"j1"})
    rr, pp = pr_points(r, p)
    np.testing.assert_allclose(rr, [0.5, 1.0])
    np.testing.assert_allclose(pp, [1 / 3, 2 / 4])
    # a perfect query: every point at precision 1, drawn inside the frame, not on it
    perfect = precision_recall(["p1", "p2", "n1"], {"p1", "p2"}, set())
    none = precision_recall(["n1"], {"p1"}, set())
    ch = pr_chart([("perfect", *perfect, "#q-perfect", 1.0), ("miss", *none, None, 0.0),
                   ("one", *precision_recall(["n", "p"], {"p"}, set()), None, 0.25)])
    fr = ch.frame
    assert [c.name for c in ch.curves] == ["perfect", "one"]  # nothing to draw for "miss"
    pts = [tuple(map(float, xy.split(","))) for xy in ch.curves[0].points.split()]
    assert pts == [(fr.px(0.5), fr.py(1.0)), (fr.px(1.0), fr.py(1.0))]
    assert fr.py(1.0) == pytest.approx(fr.y0 + PAD) and fr.px(1.0) == pytest.approx(fr.x1 - PAD)
    assert fr.py(0.0) == pytest.approx(fr.y1 - PAD)
    assert ch.curves[1].dot == (fr.px(1.0), fr.py(0.5))  # one positive: a dot, not (0, 0)
    assert ch.n_queries == 3 and fr.width >= 700  # a chart one can read


def test_ap_chart_geometry() -> None:
    items = [("q_with_a_long_name_" + "x" * 40, 0.1, "#a"), ("b", 0.9, None),
             ("c", float("nan"), None)]
    ch = ap_chart(items, 0.5)
    assert [b.name for b in ch.bars] == [items[0][0], "b"] and ch.left_out == 1
    assert ch.bars[0].href == "#a" and ch.bars[1].href is None
    assert ch.bars[0].label.startswith("…") and len(ch.bars[0].label) == 28
    assert [b.tone for b in ch.bars] == ["poor", "good"]
    fr = ch.frame
    # the axis title sits below the longest rotated label
    assert ch.title_y - ch.label_y > 28 * 6.4
    assert ch.bars[1].y == pytest.approx(fr.py(0.9)) and ch.mean_y == fr.py(0.5)
    many = ap_chart([(f"q{i}", i / 200, None) for i in range(200)], 0.5)
    assert all(b.label is None for b in many.bars)  # too narrow for labels
    assert many.frame.bottom < 60


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium")
                                        .exists() else None)


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp / 'chrome-profile'}", *args],
        capture_output=True, text=True, timeout=120)


# Appended to a copy of the page: measures the AP chart's labels in the browser's own
# layout, then clicks the order toggle twice, and writes what it saw into the DOM.
_PROBE = """<script>
(function () {
  function box(e) { var r = e.getBoundingClientRect();
    return {l: r.left, t: r.top, r: r.right, b: r.bottom}; }
  function hit(a, b) { return a.l < b.r && b.l < a.r && a.t < b.b && b.t < a.b; }
  var svg = box(document.getElementById("ap-chart"));
  var title = box(document.querySelector("#ap-chart .x-title"));
  var labels = Array.prototype.map.call(document.querySelectorAll("#ap-chart .xlabel"), box);
  var order = function () { return Array.prototype.map.call(
      document.querySelectorAll("#queries section"), function (s) { return s.dataset.name; }); };
  var rows = function () { return Array.prototype.map.call(
      document.querySelectorAll("#index tbody tr"), function (s) { return s.dataset.name; }); };
  var out = {n_labels: labels.length,
    title_hit: labels.some(function (l) { return hit(l, title); }),
    label_hit: labels.some(function (l, i) { return i > 0 && hit(l, labels[i - 1]); }),
    inside: labels.concat([title]).every(function (l) {
      return l.t >= svg.t && l.b <= svg.b && l.l >= svg.l - 1 && l.r <= svg.r + 1; }),
    initial: order()};
  var button = document.getElementById("order-toggle");
  button.click(); out.by_name = order(); out.rows_by_name = rows();
  button.click(); out.back = order();
  var pre = document.createElement("pre"); pre.id = "probe";
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
})();
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(apt-get install chromium) - headless render check skipped")
def test_renders_in_headless_chromium(setup) -> None:
    s, gt, rk, tmp = setup
    index = write_report(tmp / "run" / "bow", gt, s, {"map": 0.625}, rk)
    shot = tmp / "shot.png"
    r = _chromium(tmp, f"--screenshot={shot}", "--window-size=1200,3000", index.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 3000)
        a = np.asarray(im.convert("RGB")).astype(int)
    assert a.std() > 10  # not a blank page
    for colour in (POS, NEG, JUNK):  # the result frames were painted
        assert (np.abs(a - colour).sum(-1) < 30).sum() > 200, colour
    r = _chromium(tmp, "--dump-dom", index.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "BLCF report: tiny" in r.stdout and 'data-query="sub/qb"' in r.stdout
    assert "AP 0.7917" in r.stdout
    # layout and the toggle, measured by the browser itself
    probe = index.with_name("probe.html")
    probe.write_text(index.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
                     encoding="utf-8")
    r = _chromium(tmp, "--dump-dom", probe.as_uri())
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout)
    assert m, r.stderr[-2000:]
    out = json.loads(m.group(1).replace("&quot;", '"'))
    assert out["n_labels"] == 2
    assert not out["title_hit"] and not out["label_hit"] and out["inside"], out
    assert out["initial"] == ["sub/qb", "qa"]  # worst first
    assert out["by_name"] == ["qa", "sub/qb"] and out["rows_by_name"] == ["qa", "sub/qb"]
    assert out["back"] == ["sub/qb", "qa"]


def test_summary_paths_are_relative_to_the_working_folder(tmp_path, monkeypatch):
    """The summary names the run as the user typed it (no machine path) when it lies
    under the working folder, and absolutely otherwise."""
    from lib.evaluation.report import shown_path

    (tmp_path / "runs" / "demo" / "bow").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "runs" / "demo" / "bow") == "runs/demo/bow"
    assert shown_path("runs/demo/bow") == "runs/demo/bow"
    outside = tmp_path.parent / "elsewhere"
    assert shown_path(outside) == str(outside)
