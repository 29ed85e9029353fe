"""The visual HTML report of one ranking folder (step E), for any dataset.

Why: a mAP number says nothing about *how* a system fails. The report shows a summary,
two charts (per-query AP, worst first, each bar linking to its query; every query's
precision-recall curve), an index of the queries worst first (a button switches to name
order), and one section per query with an anchor: the query image with its box, its AP,
its search mode (box or whole image, and why), the top-k results framed green / red /
grey for positive / negative / junk with their scores and localisation boxes, and, when
a negative outranks the first positive, that negative and the first positive side by
side with the query, which is usually where the reason for a failure shows.

Built with Jinja2 templates (``templates/``, autoescaped) and inline SVG charts
(:mod:`lib.evaluation.charts`). Layout (``<ranking_dir>/report/``, replaced atomically as
a whole): ``index.html`` and ``thumbs/`` (one small JPEG per image shown, named by a hash
of its id; boxes are CSS overlays in percent of the image, so one thumbnail serves every
box on that image). The page needs no network; its only script is the order toggle,
inline in the page.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from PIL import Image, ImageDraw
from tqdm import tqdm

from lib.artefacts import atomic_path
from lib.errors import UserError
from lib.evaluation.charts import ap_chart, pr_chart
from lib.evaluation.metrics import evaluate, precision_recall
from lib.features.images import load_image
from lib.groundtruth.common import GroundTruth, Query
from lib.groundtruth.loader import image_path

log = logging.getLogger(__name__)

THUMB_SIDE = 240  # longer side of a thumbnail file, pixels (sharp on high-DPI screens)
SHOW_SIDE = 160  # longer side as displayed in a result row, CSS pixels
AID_SIDE = 240  # longer side in the "why did this fail" panel
_PER_QUERY_KEYS = ("per_query", "aps", "ap", "query_ap")
FRAME_COLOURS = {"query": "#1f3b8f", "pos": "#1a9e1a", "neg": "#d62728", "junk": "#9e9e9e"}
FRAME_LABELS = {"query": "query", "pos": "positive", "neg": "negative", "junk": "junk"}
BOX_KEYS = {"qbox": ("#00e5ff", "query box"),
            "loc": ("#ffd400", "object found by spatial re-ranking")}


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


def first_hits(labels: Iterable[str]) -> tuple[int | None, int | None]:
    """0-based positions of the first negative and of the first positive in ``labels``
    (None when absent), reading no further than the first positive (lists can be a
    million long)."""
    first_neg = None
    for k, lab in enumerate(labels):
        if lab == "pos":
            return first_neg, k
        if lab == "neg" and first_neg is None:
            first_neg = k
    return first_neg, None


def first_negative_above_positive(labels: Iterable[str]) -> tuple[int, int | None] | None:
    """(position of the first negative, of the first positive or None when no positive
    is listed) when a negative outranks every positive; junk is skipped, as in AP. None
    when the first non-junk result is a positive."""
    neg, pos = first_hits(labels)
    if neg is None:
        return None
    return neg, pos


# --------------------------------------------------------------------------- selection


def worst_first(names: Sequence[str], aps: Mapping[str, float]) -> list[str]:
    """Queries by AP, lowest first, ties in query order; queries without an AP last."""
    finite = [n for n in names if math.isfinite(aps.get(n, float("nan")))]
    rest = [n for n in names if n not in set(finite)]
    return sorted(finite, key=lambda n: aps[n]) + rest  # stable: ties keep query order


def select_queries(names: Sequence[str], aps: Mapping[str, float], max_queries: int
                   ) -> list[str]:
    """The queries that get a section, worst first: all when they fit, else the worst
    half and the best half by AP (queries without an AP only when all fit)."""
    order = worst_first(names, aps)
    if len(names) <= max_queries:
        return order
    finite = [n for n in order if math.isfinite(aps[n])]
    n_worst = (max_queries + 1) // 2
    worst = finite[:n_worst]
    best = finite[n_worst:][-(max_queries - len(worst)):] if max_queries > len(worst) else []
    return worst + best


def anchors(names: Sequence[str]) -> dict[str, str]:
    """A stable, URL-safe anchor per query (``q-`` and the name with other characters
    replaced; a numbered suffix when two names collide)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for n in names:
        base = "q-" + re.sub(r"[^A-Za-z0-9_.-]", "_", n)
        a, k = base, 2
        while a in used:
            a, k = f"{base}-{k}", k + 1
        used.add(a)
        out[n] = a
    return out


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


# --------------------------------------------------------------------------- page model


@dataclass
class Figure:
    """One framed image: CSS class (query/pos/neg/junk), thumbnail, shape as fractions of
    its longer side, a box in percent (left, top, width, height) and caption lines."""

    cls: str
    src: str
    w: float
    h: float
    alt: str
    caption: list[str]
    box: tuple[str, str, str, str] | None = None
    box_cls: str = ""


@dataclass
class Section:
    name: str
    anchor: str
    worst: int
    ap_text: str
    n_pos_text: str
    first_pos: str
    mode: str
    why: str
    query_fig: Figure
    results: list[Figure] = field(default_factory=list)
    aid: dict[str, Figure | None] | None = None


def box_percent(box: Sequence[float] | None, orig: tuple[int, int] | None
                ) -> tuple[str, str, str, str] | None:
    """A pixel box as left, top, width, height in percent of the image, clipped to it;
    None when it is empty or the image size is unknown."""
    if box is None or orig is None:
        return None
    w, h = orig
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = max(0.0, x1 / w * 100), max(0.0, y1 / h * 100)
    right, bottom = min(100.0, x2 / w * 100), min(100.0, y2 / h * 100)
    if right <= left or bottom <= top:
        return None
    return f"{left:.2f}", f"{top:.2f}", f"{right - left:.2f}", f"{bottom - top:.2f}"


def _figure(cls: str, t: _Thumb, alt: str, caption: list[str],
            box: Sequence[float] | None = None, box_cls: str = "") -> Figure:
    w, h = t.size
    m = max(w, h, 1)
    return Figure(cls, t.file, w / m, h / m, alt, caption, box_percent(box, t.orig), box_cls)


def _fmt_ap(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else (words or word + 's')}"


def _settings_rows(settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    as_dict = getattr(settings, "as_dict", None)
    d = dict(as_dict()) if callable(as_dict) else {k: settings[k] for k in settings}
    return [(k, str(v)) for k, v in sorted(d.items())]


def shown_path(path: str | Path) -> str:
    """``path`` as the summary shows it: relative to the working folder when inside it
    (the run as the user typed it, e.g. ``runs/demo/bow``), else absolute."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (ValueError, OSError):
        return str(p)


def summary_rows(results: Mapping[str, Any], gt: GroundTruth, ranking_dir: Path,
                 n_listed: int, mean_ap: float, modes: Mapping[str, Mapping[str, str]],
                 masking: int | None) -> list[tuple[str, str]]:
    """The summary table: each fact once, under a human label."""
    rows = [("Dataset", gt.name), ("Protocol", gt.protocol),
            ("Ranking folder", shown_path(ranking_dir)), ("Database images", f"{len(gt.db_ids):,}")]
    n_eval = results.get("n_queries")
    no_pos = list(results.get("queries_without_positives") or [])
    if not isinstance(n_eval, int):
        n_eval = n_listed - len(no_pos)
    rows.append(("Queries", f"{n_listed} ranked, {n_eval} evaluated"))
    if no_pos:
        rows.append(("Left out of the mean (no positives)", ", ".join(no_pos)))
    unranked = list(results.get("queries_without_ranking") or [])
    if unranked:
        rows.append(("Ground-truth queries without a ranking", ", ".join(unranked)))
    label = "mAP (Medium)" if gt.protocol == "revisited" else \
        "mAP (shot level)" if results.get("level") == "shot" else "mAP"
    rows.append((label, _fmt_ap(mean_ap)))
    if modes:
        counts: dict[tuple[str, str], int] = {}
        for m in modes.values():
            counts[(m["mode"], m["why"])] = counts.get((m["mode"], m["why"]), 0) + 1
        text = "; ".join(f"{m} for {_plural(c, 'query', 'queries')} ({why})"
                         for (m, why), c in sorted(counts.items(), key=lambda t: -t[1]))
        if masking is not None:
            text = f"masking {masking}: {text}"
        rows.append(("Search", text))
    gtr = results.get("ground_truth")
    if isinstance(gtr, Mapping):
        where = shown_path(gtr["path_gt"]) if gtr.get("path_gt") else ""
        rows.append(("Ground truth", f"{where} ({gtr.get('gt_format', '')})"))
    return rows


def summary_tables(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Tables under the summary: Easy/Medium/Hard (revisited), per-landmark or per-topic
    means, each with readable headers."""
    tables = []
    blocks = [(k, results[k]) for k in ("easy", "medium", "hard")
              if isinstance(results.get(k), Mapping)]
    if blocks:
        tables.append({"id": "protocols", "cls": "protocols",
                       "caption": "Revisited protocol",
                       "head": ["protocol", "mAP", "mP@1", "mP@5", "mP@10", "queries evaluated"],
                       "rows": [[k.capitalize(), _fmt_ap(b.get("map")), _fmt_ap(b.get("mp@1")),
                                 _fmt_ap(b.get("mp@5")), _fmt_ap(b.get("mp@10")),
                                 str(b.get("n_queries", ""))] for k, b in blocks]})
    for key, caption, head in (("per_landmark", "Mean AP per landmark", "landmark"),
                               ("per_topic", "Mean AP per topic", "topic")):
        v = results.get(key)
        if isinstance(v, Mapping) and v:
            tables.append({"id": key.replace("_", "-"), "cls": "per-topic", "caption": caption,
                           "head": [head, "mean AP"],
                           "rows": [[str(t), _fmt_ap(a)] for t, a in sorted(v.items())]})
    return tables


def _environment() -> Environment:
    return Environment(loader=PackageLoader("lib.evaluation", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _scores(ranking_dir: Path, n_q: int, n_db: int) -> np.ndarray | None:
    """The folder's scores.npy (memory-mapped) when it fits the lists, else None."""
    from lib.search.rankings import read_scores

    if not (ranking_dir / "scores.npy").is_file():
        return None
    try:
        s = read_scores(ranking_dir)
    except (UserError, OSError, ValueError) as e:
        log.warning("report: %s/scores.npy unreadable (%s); no scores shown", ranking_dir, e)
        return None
    if s.shape != (n_q, n_db):
        log.warning("report: %s/scores.npy has shape %s, not (%d, %d); no scores shown",
                    ranking_dir, s.shape, n_q, n_db)
        return None
    return s


# --------------------------------------------------------------------------- main entry


def write_report(ranking_dir: Path, gt: GroundTruth, settings: Mapping[str, Any],
                 results: dict, rankings: Any) -> Path:
    """Write ``<ranking_dir>/report/index.html`` (with ``thumbs/``) and return its path.
    ``rankings`` is a :class:`lib.search.rankings.Rankings` (its ``queries``, ``lists``,
    ``meta`` and ``localisations`` are read; scores come from ``scores.npy`` in
    ``ranking_dir`` when it is there); ``results`` is step E's results dict (``map``,
    per-query AP, ``search_mode``; computed here when absent)."""
    from lib.evaluation.step import search_modes

    ranking_dir = Path(ranking_dir)
    top_k = int(settings["report_top_k"])
    max_q = int(settings["report_max_queries"])
    names = list(rankings.queries)
    by_name = {q.name: q for q in gt.queries}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(f"{ranking_dir}: query '{missing[0]}' is not in ground truth {gt.name}")
    judged = {n: _judgements(gt, by_name[n]) for n in names}
    aps = per_query_ap(results, names)
    if aps is None:
        log.info("report: no per-query AP in the results; evaluating the rankings")
        aps = per_query_ap(evaluate(gt, rankings), names)
        assert aps is not None  # lib.evaluation.metrics always gives per_query
    finite = [v for v in aps.values() if math.isfinite(v)]
    mean_ap = results.get("map", results.get("mAP"))
    mean_ap = float(mean_ap) if isinstance(mean_ap, (int, float)) else \
        float(np.mean(finite)) if finite else float("nan")
    sm = results.get("search_mode")
    if not isinstance(sm, Mapping) or not all(n in sm.get("per_query", {}) for n in names):
        sm = search_modes(settings, getattr(rankings, "meta", None) or {},
                          [by_name[n] for n in names])
    modes = {n: sm["per_query"][n] for n in names}

    order = worst_first(names, aps)
    rank_of = {n: i for i, n in enumerate(order)}
    shown = select_queries(names, aps, max_q)
    anchor = anchors(names)
    href = {n: "#" + anchor[n] for n in shown}
    def labels_of(n: str) -> Iterable[str]:
        return (_label(judged[n], gt, i) for i in rankings.lists[n])

    hits = {n: first_hits(labels_of(n)) for n in names}
    first_pos = {n: None if hits[n][1] is None else hits[n][1] + 1 for n in names}
    aids = {n: first_negative_above_positive(labels_of(n)) if judged[n].positives else None
            for n in shown}
    locs = rankings.localisations or {}
    db_index = {i: k for k, i in enumerate(gt.db_ids)}
    scores = _scores(ranking_dir, len(names), len(gt.db_ids))
    q_row = {n: k for k, n in enumerate(names)}

    curves = []
    for n in names:
        j = judged[n]
        if not j.positives:
            continue
        r, p = precision_recall(_evaluable_list(j, gt, rankings.lists[n]), j.positives, j.junk)
        curves.append((n, np.asarray(r, np.float64), np.asarray(p, np.float64),
                       href.get(n), aps[n]))

    out = ranking_dir / "report"
    with atomic_path(out) as tmp:
        (tmp / "thumbs").mkdir(parents=True)
        jobs: dict[str, tuple[Path | None, Path, str]] = {}

        def want(image_id: str, query: bool) -> str:
            key = ("q:" if query else "d:") + image_id
            jobs.setdefault(key, (_find(settings, image_id, query),
                                  tmp / "thumbs" / _thumb_name(key[0], image_id), image_id))
            return key

        for n in shown:
            want(by_name[n].image, True)
            for i in rankings.lists[n][:top_k]:
                want(i, False)
            if aids[n] is not None:
                for k in aids[n]:
                    if k is not None:
                        want(rankings.lists[n][k], False)
        # sequential: load_image swaps PIL's global bomb limit while it decodes
        max_px = settings.get("max_image_pixels")
        made = {k: _make_thumb(*a, max_px) for k, a in
                tqdm(jobs.items(), desc="report thumbnails", unit="img", leave=False,
                     disable=len(jobs) < 200)}

        frames_used: set[str] = set()
        boxes_used: set[str] = set()

        def result_figure(n: str, k: int, qloc: Mapping[str, Any], extra: str = ""
                          ) -> Figure:
            i = rankings.lists[n][k]
            cls = _label(judged[n], gt, i)
            frames_used.add(cls)
            cap = [f"#{k + 1} {i}"]
            if scores is not None:
                cap.append(f"score {float(scores[q_row[n], db_index[i]]):.4f}")
            if extra:
                cap.append(extra)
            e = qloc.get(i)
            box = e.get("box") if e else None
            f = _figure(cls, made["d:" + i], i, cap, box, "loc")
            if f.box is not None:
                boxes_used.add("loc")
            return f

        sections = []
        for n in shown:
            q = by_name[n]
            qloc = {e["image"]: e for e in locs.get(n, [])}
            t = made["q:" + q.image]
            qfig = _figure("query", t, q.image, ["query", q.image], q.bbox, "qbox")
            frames_used.add("query")
            if qfig.box is not None:
                boxes_used.add("qbox")
            n_pos = len(judged[n].positives)
            unit = "relevant shot" if judged[n].shot_level else "positive"
            fp = first_pos[n]
            sec = Section(
                n, anchor[n], rank_of[n],
                f"AP {aps[n]:.4f}" if math.isfinite(aps[n]) else "AP n/a (no positives)",
                _plural(n_pos, unit), "—" if fp is None else str(fp),
                modes[n]["mode"], modes[n]["why"], qfig)
            sec.results = [result_figure(n, k, qloc)
                           for k in range(min(top_k, len(rankings.lists[n])))]
            if aids[n] is not None:
                neg_k, pos_k = aids[n]
                sec.aid = {"neg": result_figure(n, neg_k, qloc, "first negative"),
                           "pos": None if pos_k is None else
                           result_figure(n, pos_k, qloc, "first positive")}
            sections.append(sec)

        index_rows = [{"name": n, "href": href.get(n), "worst": rank_of[n],
                       "ap": _fmt_ap(aps[n]),
                       "first_pos": "—" if first_pos[n] is None else str(first_pos[n]),
                       "mode": modes[n]["mode"], "why": modes[n]["why"]} for n in order]
        shown_note = ""
        if len(shown) < len(names):
            shown_note = (f"{len(shown)} of {len(names)} queries shown: the worst and the best "
                          "by AP (setting report_max_queries); the index lists all.")
        page = _environment().get_template("report.html.j2").render(
            dataset=gt.name, ranking=ranking_dir.name,
            summary=summary_rows(results, gt, ranking_dir, len(names), mean_ap, modes,
                                 sm.get("masking")),
            tables=summary_tables(results), settings=_settings_rows(settings),
            ap=ap_chart([(n, aps[n], href.get(n)) for n in order], mean_ap),
            pr=pr_chart(curves), index=index_rows, shown_note=shown_note,
            legend_frames=[(c, FRAME_COLOURS[c], FRAME_LABELS[c])
                           for c in ("query", "pos", "neg", "junk") if c in frames_used],
            legend_boxes=[(c, *BOX_KEYS[c]) for c in ("qbox", "loc") if c in boxes_used],
            scores_shown=scores is not None, reranked=bool(locs), sections=sections,
            show_side=SHOW_SIDE, aid_side=AID_SIDE)
        (tmp / "index.html").write_text(page, encoding="utf-8")
    log.info("report written to %s", out / "index.html")
    return out / "index.html"
