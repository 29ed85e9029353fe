"""The visual HTML report of one ranking folder (step E), for any dataset.

Why: a mAP number says nothing about *how* a system fails. The report shows, per query,
the query image with its box and the top-k results with their localisation boxes (from
spatial re-ranking when it ran), framed green / red / grey for positive / negative / junk,
with the query's AP; a summary table; and two PNG charts (per-query AP, precision-recall).

Layout (``<ranking_dir>/report/``, replaced atomically as a whole):
``index.html``, ``ap_per_query.png``, ``pr_curves.png`` and ``thumbs/`` (one small JPEG
per image shown, named by a hash of its id; boxes are drawn by the page as CSS overlays in
percent of the image, so one thumbnail serves every box on that image). The page needs no
network and no JavaScript.
"""

from __future__ import annotations

import hashlib
import html
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from lib.artefacts import atomic_path
from lib.errors import UserError
from lib.evaluation.metrics import evaluate, precision_recall
from lib.evaluation.plots import Series, bar_chart, line_chart
from lib.features.images import load_image
from lib.groundtruth.common import GroundTruth, Query
from lib.groundtruth.loader import image_path

log = logging.getLogger(__name__)

THUMB_SIDE = 240  # longer side of a thumbnail file, pixels (sharp on high-DPI screens)
SHOW_SIDE = 160  # longer side as displayed on the page, CSS pixels
RECALL_LEVELS = np.linspace(0.0, 1.0, 101)
_PER_QUERY_KEYS = ("per_query", "aps", "ap", "query_ap")


# --------------------------------------------------------------------------- inputs


def _as_float(v: Any) -> float | None:
    if isinstance(v, Mapping):
        v = v.get("ap", v.get("AP"))
    if v is None:  # a query without positives
        return float("nan")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def per_query_ap(results: Mapping[str, Any], names: Sequence[str]) -> dict[str, float] | None:
    """Per-query AP from a results dict: a mapping name -> AP (or -> {"ap": ...}), or a
    list in query order, under one of ``per_query``, ``aps``, ``ap``, ``query_ap`` (at the
    top level, else inside ``medium``: the revisited protocol's plain evaluation)."""
    nested = results.get("medium")
    if isinstance(nested, Mapping) and not any(k in results for k in _PER_QUERY_KEYS):
        return per_query_ap(nested, names)
    for key in _PER_QUERY_KEYS:
        v = results.get(key)
        if isinstance(v, Mapping) and all(n in v for n in names):
            vals = {n: _as_float(v[n]) for n in names}
        elif isinstance(v, (list, tuple)) and len(v) == len(names):
            vals = {n: _as_float(x) for n, x in zip(names, v)}
        else:
            continue
        if all(x is not None for x in vals.values()):
            return vals  # type: ignore[return-value]
    return None


@dataclass
class _Judged:
    positives: frozenset[str] | set[str]
    junk: frozenset[str] | set[str]
    shot_level: bool  # TRECVid: judge by the keyframe's shot


def _judgements(gt: GroundTruth, q: Query) -> _Judged:
    if gt.protocol == "trecvid" and gt.relevant_shots is not None:
        return _Judged(gt.relevant_shots.get(q.name, frozenset()), frozenset(), True)
    return _Judged(q.positives, q.junk, False)


def _label(j: _Judged, gt: GroundTruth, image_id: str) -> str:
    key = (gt.shots or {}).get(image_id, image_id) if j.shot_level else image_id
    if key in j.positives:
        return "pos"
    return "junk" if key in j.junk else "neg"


def _evaluable_list(j: _Judged, gt: GroundTruth, ranked: Sequence[str]) -> list[str]:
    """The list AP is computed on: keyframes, or shots (first keyframe wins) for TRECVid."""
    if not j.shot_level:
        return list(ranked)
    shots = gt.shots or {}
    return list(dict.fromkeys(shots.get(i, i) for i in ranked))


# --------------------------------------------------------------------------- selection


def select_queries(names: Sequence[str], aps: Mapping[str, float], max_queries: int
                   ) -> list[tuple[str, list[str]]]:
    """Sections of queries to show: all in order when they fit, else the worst half and
    the best half by AP (ties in query order; queries without an AP last)."""
    if len(names) <= max_queries:
        return [("All queries", list(names))]
    finite = [n for n in names if math.isfinite(aps.get(n, float("nan")))]
    by_ap = sorted(finite, key=lambda n: aps[n])  # stable: ties keep query order
    n_worst = (max_queries + 1) // 2
    worst = by_ap[:n_worst]
    taken = set(worst)
    best = [n for n in sorted(finite, key=lambda n: -aps[n]) if n not in taken]
    best = best[: max_queries - len(worst)]
    return [(f"Worst {len(worst)} queries", worst), (f"Best {len(best)} queries", best)]


# --------------------------------------------------------------------------- thumbnails


@dataclass
class _Thumb:
    file: str  # relative to the report folder
    size: tuple[int, int]  # thumbnail w, h
    orig: tuple[int, int] | None  # original w, h (None when the image could not be read)


def _make_thumb(src: Path | None, dest: Path, label: str, max_pixels: int | None) -> _Thumb:
    rel = f"thumbs/{dest.name}"
    try:
        if src is None:
            raise UserError(f"image '{label}' not found")
        im = load_image(src, max_pixels)
        orig = im.size
        im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR)
    except (UserError, OSError, ValueError) as e:
        log.warning("report: %s: %s (placeholder shown)", label, e)
        im = Image.new("RGB", (THUMB_SIDE, THUMB_SIDE * 3 // 4), (200, 200, 200))
        ImageDraw.Draw(im).text((8, 8), "missing", fill=(80, 80, 80))
        orig = None
    im.save(dest, format="JPEG", quality=85)
    return _Thumb(rel, im.size, orig)


def _thumb_name(kind: str, image_id: str) -> str:
    return f"{kind}_{hashlib.sha1(image_id.encode('utf-8')).hexdigest()[:16]}.jpg"


def _find(settings: Mapping[str, Any], image_id: str, query: bool) -> Path | None:
    try:
        return image_path(settings, image_id, query=query)
    except UserError:
        return None


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:16px 24px;color:#222}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;margin:24px 0 8px}
h3{font-size:15px;margin:16px 0 4px}
table{border-collapse:collapse;margin:4px 0 12px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:13px}th{background:#f3f3f3}td.num{text-align:right}
.plots img{max-width:100%;margin-right:12px;border:1px solid #ddd}
.row{display:flex;flex-wrap:wrap;align-items:flex-start;gap:6px}
figure{margin:0;text-align:center;font-size:11px;max-width:180px}
.frame{position:relative;display:inline-block;line-height:0;border:5px solid #1f3b8f}
.pos .frame{border-color:#1a9e1a}.neg .frame{border-color:#d62728}
.junk .frame{border-color:#9e9e9e}
.box{position:absolute;border:2px solid #ffd400;outline:1px solid #000}
.query .box{border-color:#00e5ff}
figcaption{line-height:1.3;padding-top:2px;word-break:break-all}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;color:#fff;font-size:12px}
.ap{font-weight:normal;color:#555}
"""


def _box_div(box: Sequence[float] | None, orig: tuple[int, int] | None, cls: str) -> str:
    if box is None or orig is None:
        return ""
    w, h = orig
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = max(0.0, x1 / w * 100), max(0.0, y1 / h * 100)
    right, bottom = min(100.0, x2 / w * 100), min(100.0, y2 / h * 100)
    if right <= left or bottom <= top:
        return ""
    return (f'<div class="box {cls}" style="left:{left:.2f}%;top:{top:.2f}%;'
            f'width:{right - left:.2f}%;height:{bottom - top:.2f}%"></div>')


def _figure(cls: str, thumb: _Thumb, alt: str, caption: str, box_html: str) -> str:
    w, h = thumb.size
    f = SHOW_SIDE / max(w, h, 1)
    w, h = round(w * f), round(h * f)
    return (f'<figure class="{cls}"><div class="frame"><img src="{html.escape(thumb.file)}" '
            f'width="{w}" height="{h}" alt="{html.escape(alt)}">{box_html}</div>'
            f"<figcaption>{caption}</figcaption></figure>")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4f}"
    return html.escape(str(v))


def _summary_rows(results: Mapping[str, Any], names: Sequence[str], prefix: str = ""
                  ) -> list[tuple[str, str]]:
    """Scalars of the results dict, nested dicts flattened as ``a.b`` (per-query dicts,
    lists and long tables left out)."""
    rows = []
    for k, v in results.items():
        if k in _PER_QUERY_KEYS or k == "settings":  # settings: in their own table
            continue
        if isinstance(v, Mapping):
            if len(v) > 50 or (names and set(v) >= set(names)):
                continue
            rows += _summary_rows(v, names, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            rows.append((f"{prefix}{k}", _fmt(v)))
    return rows


def _settings_dict(settings: Mapping[str, Any]) -> dict[str, Any]:
    as_dict = getattr(settings, "as_dict", None)
    return dict(as_dict()) if callable(as_dict) else {k: settings[k] for k in settings}


# --------------------------------------------------------------------------- plots


def _pr_plot(curves: list[tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    series = []
    interp = []
    for r, p in curves:
        if r.size == 0:
            continue
        # plot only where recall changes (and the point before), enough for the shape
        at = np.flatnonzero(np.diff(np.r_[0.0, r]) > 0)
        keep = np.unique(np.r_[at, np.maximum(at - 1, 0), r.size - 1])
        series.append(Series(np.r_[0.0, r[keep]], np.r_[1.0, p[keep]], colour=(200, 200, 200),
                             width=1.0))
        pmax = np.maximum.accumulate(p[::-1])[::-1]
        idx = np.searchsorted(r, RECALL_LEVELS, side="left")
        interp.append(np.where(idx < r.size, pmax[np.minimum(idx, r.size - 1)], 0.0))
    if interp:
        series.append(Series(RECALL_LEVELS, np.mean(interp, axis=0),
                             label="mean interpolated precision", colour=(31, 119, 180),
                             width=2.5))
    line_chart(series, path, title=f"Precision-recall ({len(curves)} queries)",
               xlabel="recall", ylabel="precision")


def _ap_plot(aps: Mapping[str, float], mean_ap: float, path: Path) -> None:
    items = sorted(((v, n) for n, v in aps.items() if math.isfinite(v)), key=lambda t: -t[0])
    vals = [v for v, _ in items]
    colours = [(26, 158, 26) if v >= 0.5 else (214, 39, 40) if v < 0.2 else (255, 165, 0)
               for v in vals]
    bar_chart(vals, path, title="AP per query (sorted)", xlabel="query", ylabel="AP",
              labels=[n for _, n in items] if len(items) <= 60 else None, colours=colours,
              hline=mean_ap, hline_label=f"mAP {mean_ap:.4f}")


# --------------------------------------------------------------------------- main entry


def write_report(ranking_dir: Path, gt: GroundTruth, settings: Mapping[str, Any],
                 results: dict, rankings: Any) -> Path:
    """Write ``<ranking_dir>/report/index.html`` (with ``thumbs/`` and two PNG charts)
    and return its path. ``rankings`` is a :class:`lib.search.rankings.Rankings` (its
    ``queries``, ``lists`` and ``localisations`` are read); ``results`` is step E's
    results dict (``map`` and per-query AP; computed here when absent)."""
    ranking_dir = Path(ranking_dir)
    top_k = int(settings["report_top_k"])
    max_q = int(settings["report_max_queries"])
    names = list(rankings.queries)
    by_name = {q.name: q for q in gt.queries}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(f"{ranking_dir}: query '{missing[0]}' is not in ground truth {gt.name}")
    judged = {n: _judgements(gt, by_name[n]) for n in names}
    curves = {}
    for n in names:
        j = judged[n]
        r, p = precision_recall(_evaluable_list(j, gt, rankings.lists[n]), j.positives, j.junk)
        curves[n] = (np.asarray(r, np.float64), np.asarray(p, np.float64))
    aps = per_query_ap(results, names)
    if aps is None:
        log.info("report: no per-query AP in the results; evaluating the rankings")
        aps = per_query_ap(evaluate(gt, rankings), names)
        assert aps is not None  # lib.evaluation.metrics always gives per_query
    finite = [v for v in aps.values() if math.isfinite(v)]
    mean_ap = results.get("map", results.get("mAP"))
    mean_ap = float(mean_ap) if isinstance(mean_ap, (int, float)) else \
        float(np.mean(finite)) if finite else float("nan")
    sections = select_queries(names, aps, max_q)
    locs = rankings.localisations or {}

    out = ranking_dir / "report"
    with atomic_path(out) as tmp:
        (tmp / "thumbs").mkdir(parents=True)
        # one thumbnail per distinct image shown
        jobs: dict[str, tuple[Path | None, Path, str]] = {}
        for _, qs in sections:
            for n in qs:
                qid = by_name[n].image
                jobs.setdefault("q:" + qid, (_find(settings, qid, True),
                                             tmp / "thumbs" / _thumb_name("q", qid), qid))
                for i in rankings.lists[n][:top_k]:
                    jobs.setdefault("d:" + i, (_find(settings, i, False),
                                               tmp / "thumbs" / _thumb_name("d", i), i))
        # sequential: load_image swaps PIL's global bomb limit while it decodes
        max_px = settings.get("max_image_pixels")
        made = {k: _make_thumb(*a, max_px) for k, a in
                tqdm(jobs.items(), desc="report thumbnails", unit="img", leave=False,
                     disable=len(jobs) < 200)}
        _ap_plot(aps, mean_ap, tmp / "ap_per_query.png")
        _pr_plot([curves[n] for n in names if judged[n].positives], tmp / "pr_curves.png")

        parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                 f"<title>BLCF report: {html.escape(gt.name)} / {html.escape(ranking_dir.name)}"
                 f"</title><style>{_CSS}</style></head><body>",
                 f"<h1>BLCF report: {html.escape(gt.name)} &mdash; "
                 f"{html.escape(ranking_dir.name)}</h1>"]
        summary = [("dataset", html.escape(gt.name)), ("protocol", html.escape(gt.protocol)),
                   ("ranking folder", html.escape(str(ranking_dir))),
                   ("queries", str(len(names))), ("database images", str(len(gt.db_ids))),
                   ("mAP", _fmt(mean_ap))]
        shown_keys = {"map", "mAP", "protocol", "dataset"}
        summary += [r for r in _summary_rows(results, names) if r[0] not in shown_keys]
        parts.append("<h2>Summary</h2><table id='summary'>" + "".join(
            f"<tr><th>{html.escape(k)}</th><td class='num'>{v}</td></tr>" for k, v in summary)
            + "</table>")
        srows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>"
                        for k, v in sorted(_settings_dict(settings).items()))
        parts.append(f"<details><summary>Settings</summary><table id='settings'>{srows}"
                     "</table></details>")
        parts.append("<div class='plots'><img src='ap_per_query.png' alt='AP per query'>"
                     "<img src='pr_curves.png' alt='precision-recall curves'></div>")
        parts.append("<p class='legend'>Frames: <span style='background:#1f3b8f'>query</span>"
                     "<span style='background:#1a9e1a'>positive</span>"
                     "<span style='background:#d62728'>negative</span>"
                     "<span style='background:#9e9e9e'>junk</span> Boxes: cyan = query box, "
                     "yellow = localisation from re-ranking.</p>")
        shown = sum(len(qs) for _, qs in sections)
        if shown < len(names):
            parts.append(f"<p>{shown} of {len(names)} queries shown (setting "
                         "report_max_queries).</p>")
        qi = 0
        for title, qs in sections:
            parts.append(f"<h2>{html.escape(title)}</h2>")
            for n in qs:
                q = by_name[n]
                ap = aps[n]
                ap_txt = f"AP {ap:.4f}" if math.isfinite(ap) else "AP n/a (no positives)"
                parts.append(f"<section class='q' id='q{qi}' data-query='{html.escape(n)}'>"
                             f"<h3>{html.escape(n)} <span class='ap'>{ap_txt}</span></h3>"
                             "<div class='row'>")
                qi += 1
                t = made["q:" + q.image]
                parts.append(_figure("query", t, q.image, "query<br>" + html.escape(q.image),
                                     _box_div(q.bbox, t.orig, "qbox")))
                qloc = {e["image"]: e for e in locs.get(n, [])}
                for rank, i in enumerate(rankings.lists[n][:top_k], 1):
                    t = made["d:" + i]
                    e = qloc.get(i)
                    cap = f"#{rank} {html.escape(i)}"
                    if e is not None and e.get("score") is not None:
                        cap += f"<br>score {float(e['score']):.3f}"
                    parts.append(_figure(_label(judged[n], gt, i), t, i, cap,
                                         _box_div(e.get("box") if e else None, t.orig, "loc")))
                parts.append("</div></section>")
        parts.append("</body></html>\n")
        (tmp / "index.html").write_text("\n".join(parts), encoding="utf-8")
    log.info("report written to %s", out / "index.html")
    return out / "index.html"
