"""Geometry of the report's two charts, drawn by the page as inline SVG
(``templates/charts.svg.j2``).

Why SVG from a template rather than images: the bars and curves become elements that
link to their query's section and show its name on hover, the text stays crisp at any
zoom, and nothing is needed beyond Jinja2. This module only computes coordinates (in SVG
user units = CSS pixels); every string it returns is escaped by the template.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

CHAR_W = 6.4  # width of one character of the 11-px label font, generously rounded up
LABEL_FONT = 11
MAX_LABEL = 28  # longer query names are shortened with an ellipsis under the bars
PAD = 10  # gap between the frame and the data range, so lines at 0 and 1 stay visible


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [round(start + i * step, 10) for i in range(int((hi - start) / step + 1e-9) + 1)]


def short_label(name: str, limit: int = MAX_LABEL) -> str:
    """``name`` cut to ``limit`` characters, the end kept (query names differ at the end)."""
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


@dataclass
class Frame:
    """A plot area: the outer SVG size, the frame rectangle and the data-to-pixel map of
    the unit square [0, 1]² inset by :data:`PAD`."""

    width: float
    height: float
    left: float
    top: float
    right: float
    bottom: float

    @property
    def x0(self) -> float:
        return self.left

    @property
    def x1(self) -> float:
        return self.width - self.right

    @property
    def y0(self) -> float:
        return self.top

    @property
    def y1(self) -> float:
        return self.height - self.bottom

    def px(self, x: float) -> float:
        return round(self.x0 + PAD + x * (self.x1 - self.x0 - 2 * PAD), 2)

    def py(self, y: float) -> float:
        return round(self.y1 - PAD - y * (self.y1 - self.y0 - 2 * PAD), 2)

    def yticks(self) -> list[tuple[float, str]]:
        return [(self.py(t), f"{t:g}") for t in nice_ticks(0.0, 1.0)]

    def xticks(self) -> list[tuple[float, str]]:
        return [(self.px(t), f"{t:g}") for t in nice_ticks(0.0, 1.0)]


@dataclass
class Bar:
    x: float
    y: float
    w: float
    h: float
    tone: str  # CSS class: good / fair / poor
    name: str
    ap: float
    href: str | None  # "#<anchor>" of the query's section, None when it is not shown
    label: str | None  # under the bar, when there is room
    label_x: float = 0.0


@dataclass
class ApChart:
    frame: Frame
    bars: list[Bar]
    mean_y: float | None
    mean_label: str
    label_y: float  # where the rotated labels start (their right end, below the frame)
    title_y: float  # the axis title's baseline, below the longest label
    left_out: int  # queries without an AP (no bar)


def tone(ap: float) -> str:
    """Bar colour class: good (AP ≥ 0.5), fair, poor (AP < 0.2)."""
    return "good" if ap >= 0.5 else "poor" if ap < 0.2 else "fair"


def ap_chart(items: Sequence[tuple[str, float, str | None]], mean_ap: float | None
             ) -> ApChart:
    """Bars of per-query AP, worst first (``items``: name, AP, link or None, already in
    that order; NaN APs are left out). Labels are drawn, rotated, only when a bar is wide
    enough for the font; the bottom margin grows with the longest label so the axis
    title sits below every label."""
    finite = [(n, a, h) for n, a, h in items if math.isfinite(a)]
    n = len(finite)
    labelled = n <= 80
    slot = 16.0 if labelled else max(3.0, 960.0 / max(n, 1))
    plot_w = max(480.0, n * slot + 2 * PAD)
    longest = max((len(short_label(nm)) for nm, _, _ in finite), default=0) if labelled else 0
    bottom = 14 + (longest * CHAR_W + 10 if labelled else 0) + 26
    fr = Frame(width=56 + plot_w + 16, height=24 + 300 + bottom, left=56, top=24, right=16,
               bottom=bottom)
    x_start = fr.x0 + PAD
    base = fr.py(0.0)
    bars = []
    for i, (nm, a, href) in enumerate(finite):
        x = x_start + i * slot
        top = fr.py(min(max(a, 0.0), 1.0))
        gap = 0.15 * slot if slot >= 4 else 0.0
        bars.append(Bar(round(x + gap, 2), top, round(slot - 2 * gap, 2),
                        round(base - top, 2), tone(a), nm, a, href,
                        short_label(nm) if labelled else None, round(x + slot / 2, 2)))
    mean_y = fr.py(mean_ap) if mean_ap is not None and math.isfinite(mean_ap) else None
    return ApChart(fr, bars, mean_y,
                   f"mAP {mean_ap:.4f}" if mean_y is not None else "", fr.y1 + 8,
                   fr.height - 8, len(items) - n)


@dataclass
class Curve:
    name: str
    points: str  # "x,y x,y ..." for <polyline>; a single point is drawn as a dot
    dot: tuple[float, float] | None
    href: str | None
    ap: float


@dataclass
class PrChart:
    frame: Frame
    curves: list[Curve]
    mean_points: str
    n_queries: int
    legend: list[str] = field(default_factory=list)


def pr_points(recall: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points of a precision-recall curve: one at each retrieved positive (where the
    recall changes), so the curve starts at the first relevant hit, not at (0, 0)."""
    r = np.asarray(recall, np.float64)
    p = np.asarray(precision, np.float64)
    if r.size == 0:
        return r, p
    at = np.flatnonzero(np.diff(np.r_[0.0, r]) > 0)
    return r[at], p[at]


def interpolated(recall: np.ndarray, precision: np.ndarray, levels: np.ndarray
                 ) -> np.ndarray:
    """Interpolated precision (the best precision at any recall ≥ level) at ``levels``;
    0 past the highest recall reached."""
    r = np.asarray(recall, np.float64)
    p = np.asarray(precision, np.float64)
    if r.size == 0:
        return np.zeros(len(levels))
    pmax = np.maximum.accumulate(p[::-1])[::-1]
    idx = np.searchsorted(r, levels, side="left")
    return np.where(idx < r.size, pmax[np.minimum(idx, r.size - 1)], 0.0)


RECALL_LEVELS = np.linspace(0.0, 1.0, 101)


def pr_chart(curves: Sequence[tuple[str, np.ndarray, np.ndarray, str | None, float]]
             ) -> PrChart:
    """Every query's precision-recall curve (``curves``: name, recall and precision at
    each non-junk position, link, AP) in grey, and the mean interpolated precision at
    101 recall levels. The axes are padded so a curve at precision 1 or recall 1 is
    drawn inside the frame, not on it."""
    fr = Frame(width=720, height=540, left=60, top=16, right=20, bottom=56)
    out, interp = [], []
    for name, r, p, href, ap in curves:
        rr, pp = pr_points(r, p)
        interp.append(interpolated(r, p, RECALL_LEVELS))
        if rr.size == 0:
            continue  # no positive retrieved: nothing to draw
        pts = " ".join(f"{fr.px(a)},{fr.py(b)}" for a, b in zip(rr, pp))
        dot = (fr.px(rr[0]), fr.py(pp[0])) if rr.size == 1 else None
        out.append(Curve(name, pts, dot, href, ap))
    mean = np.mean(interp, axis=0) if interp else np.zeros(0)
    mean_pts = " ".join(f"{fr.px(a)},{fr.py(b)}" for a, b in zip(RECALL_LEVELS, mean))
    return PrChart(fr, out, mean_pts, len(curves))


__all__ = ["RECALL_LEVELS", "ApChart", "Bar", "Curve", "Frame", "PrChart", "ap_chart",
           "interpolated", "nice_ticks", "pr_chart", "pr_points", "short_label", "tone"]
