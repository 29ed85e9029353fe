"""Tiny PNG bar and line charts drawn with Pillow.

Why not matplotlib: the report needs two simple charts (per-query AP, precision-recall),
and matplotlib would be a heavy dependency for that. Charts are drawn at twice the size
and downsampled, which antialiases lines and text without extra libraries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lib.artefacts import atomic_path

SS = 2  # supersampling factor
MARGIN = {"left": 70, "right": 20, "top": 44, "bottom": 60}  # in output pixels
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


@dataclass
class Series:
    """One line of a line chart (``x`` and ``y`` of equal length)."""

    x: Sequence[float]
    y: Sequence[float]
    label: str | None = None
    colour: tuple[int, int, int] | None = None
    width: float = 1.5


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size * SS)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [round(start + i * step, 10) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}"


class _Canvas:
    """Plot area with data -> pixel mapping, axes, ticks and labels."""

    def __init__(self, size: tuple[int, int], xlim: tuple[float, float],
                 ylim: tuple[float, float]) -> None:
        self.w, self.h = size
        self.img = Image.new("RGB", (self.w * SS, self.h * SS), "white")
        self.draw = ImageDraw.Draw(self.img)
        self.x0, self.x1 = MARGIN["left"] * SS, (self.w - MARGIN["right"]) * SS
        self.y0, self.y1 = MARGIN["top"] * SS, (self.h - MARGIN["bottom"]) * SS
        self.xlim, self.ylim = xlim, ylim

    def px(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.xlim
        return self.x0 + (np.asarray(x, np.float64) - lo) / (hi - lo or 1) * (self.x1 - self.x0)

    def py(self, y: np.ndarray) -> np.ndarray:
        lo, hi = self.ylim
        return self.y1 - (np.asarray(y, np.float64) - lo) / (hi - lo or 1) * (self.y1 - self.y0)

    def text(self, xy: tuple[float, float], s: str, size: int = 12, anchor: str = "la",
             fill: tuple[int, int, int] = (0, 0, 0)) -> None:
        self.draw.text(xy, s, font=_font(size), fill=fill, anchor=anchor)

    def frame(self, title: str, xlabel: str, ylabel: str, xticks: bool = True) -> None:
        grey, dark = (225, 225, 225), (60, 60, 60)
        for t in nice_ticks(*self.ylim):
            y = float(self.py(t))
            self.draw.line([(self.x0, y), (self.x1, y)], fill=grey, width=SS)
            self.text((self.x0 - 6 * SS, y), _fmt(t), 11, "rm", dark)
        if xticks:
            for t in nice_ticks(*self.xlim):
                x = float(self.px(t))
                self.draw.line([(x, self.y0), (x, self.y1)], fill=grey, width=SS)
                self.text((x, self.y1 + 6 * SS), _fmt(t), 11, "ma", dark)
        self.draw.rectangle([self.x0, self.y0, self.x1, self.y1], outline=dark, width=SS)
        self.text(((self.x0 + self.x1) / 2, 12 * SS), title, 15, "ma")
        self.text(((self.x0 + self.x1) / 2, (self.h - 8) * SS), xlabel, 12, "md")
        label = Image.new("RGBA", (self.h * SS, 20 * SS), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((self.h * SS / 2, 10 * SS), ylabel, font=_font(12),
                                   fill=(0, 0, 0), anchor="mm")
        label = label.rotate(90, expand=True)
        top = int((self.y0 + self.y1) / 2 - label.height / 2)
        self.img.paste(label, (4 * SS, top), label)

    def legend(self, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
        x, y = self.x1 - 10 * SS, self.y0 + 10 * SS
        for label, colour in entries:
            self.text((x, y), label, 11, "ra", colour)
            y += 16 * SS

    def save(self, path: Path) -> Path:
        out = self.img.resize((self.w, self.h), Image.Resampling.LANCZOS)
        path = Path(path)
        with atomic_path(path) as tmp:
            out.save(tmp, format="PNG")
        return path


def bar_chart(values: Sequence[float], path: Path, *, title: str = "", xlabel: str = "",
              ylabel: str = "", labels: Sequence[str] | None = None,
              colours: Sequence[tuple[int, int, int]] | None = None,
              hline: float | None = None, hline_label: str | None = None,
              ylim: tuple[float, float] = (0.0, 1.0), size: tuple[int, int] = (900, 400)
              ) -> Path:
    """Vertical bars, one per value, in the given order; ``labels`` are drawn rotated
    under the bars when there is room. Returns ``path`` (a PNG, written atomically)."""
    v = np.asarray(values, np.float64)
    c = _Canvas(size, (0.0, float(max(len(v), 1))), ylim)
    c.frame(title, xlabel, ylabel, xticks=False)
    x = c.px(np.arange(len(v) + 1))
    gap = 0.15 * (x[1] - x[0]) if len(v) else 0
    top = c.py(np.clip(np.nan_to_num(v, nan=ylim[0]), *ylim))
    for i in range(len(v)):
        col = colours[i] if colours is not None else PALETTE[0]
        c.draw.rectangle([x[i] + gap, top[i], x[i + 1] - gap, c.y1], fill=col)
    room = (x[1] - x[0]) / SS if len(v) else 0
    if labels is not None and room >= 11:
        for i, s in enumerate(labels):
            lab = Image.new("RGBA", (MARGIN["bottom"] * SS, 14 * SS), (255, 255, 255, 0))
            ImageDraw.Draw(lab).text((MARGIN["bottom"] * SS - 2, 7 * SS), s[-14:],
                                     font=_font(9), fill=(40, 40, 40), anchor="rm")
            lab = lab.rotate(90, expand=True)
            c.img.paste(lab, (int((x[i] + x[i + 1]) / 2 - lab.width / 2), int(c.y1 + 2)), lab)
    if hline is not None and math.isfinite(hline):
        y = float(c.py(hline))
        c.draw.line([(c.x0, y), (c.x1, y)], fill=(214, 39, 40), width=2 * SS)
        if hline_label:
            c.legend([(hline_label, (214, 39, 40))])
    return c.save(path)


def line_chart(series: Sequence[Series], path: Path, *, title: str = "", xlabel: str = "",
               ylabel: str = "", xlim: tuple[float, float] = (0.0, 1.0),
               ylim: tuple[float, float] = (0.0, 1.0), size: tuple[int, int] = (640, 480)
               ) -> Path:
    """Lines through the points of each series (drawn in order, so later series are on
    top); a legend lists the labelled ones. Returns ``path`` (a PNG, written atomically)."""
    c = _Canvas(size, xlim, ylim)
    c.frame(title, xlabel, ylabel)
    entries = []
    for i, s in enumerate(series):
        col = s.colour or PALETTE[i % len(PALETTE)]
        x, y = c.px(s.x), c.py(np.clip(s.y, *ylim))
        pts = [(float(a), float(b)) for a, b in zip(x, y)]
        if len(pts) == 1:
            r = 2 * SS
            c.draw.ellipse([pts[0][0] - r, pts[0][1] - r, pts[0][0] + r, pts[0][1] + r],
                           fill=col)
        elif pts:
            c.draw.line(pts, fill=col, width=max(1, round(s.width * SS)), joint="curve")
        if s.label:
            entries.append((s.label, col))
    c.legend(entries)
    return c.save(path)
