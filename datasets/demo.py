#!/usr/bin/env python
"""A generated instance-retrieval set, so the demo needs no download.

Why generated: the benchmarks (Oxford5k, Paris6k) are gigabytes behind slow mirrors and a
first run should finish in minutes. Each "object" is a textured planar scene (a pattern
background, coloured shapes and rendered text) drawn with numpy/Pillow from the seed. The
database holds several photos of each object under perspective warps, scale and lighting
changes, partial occlusion and clutter backgrounds, plus distractor photos (clutter only,
or an object that is never queried). Each object has one separate query photo with the
object's bounding box. The ground truth is written in the generic (revisited) layout.

Junk rule (measured on each database view after rendering): a view of the query's object
is *junk* when less than 40 % of the object's area is visible (occluded or outside the
frame) or when its visible part covers less than 2 % of the image (``JUNK_MIN_VISIBLE``,
``JUNK_MIN_AREA``); every other view of the object is *ok*. Some objects get one extra view that is
made tiny or mostly occluded on purpose, so the junk list is exercised.

Files: ``<out>/images/<id>.jpg``, ``<out>/queries/<id>.jpg``, ``<out>/gnd_demo.json`` and
``<out>/demo_params.json`` (the generation parameters plus what each image shows). The set
is written into a temporary sibling folder and renamed at the end, so an interrupted run
leaves no half set; a second run with the same parameters does nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from lib.artefacts import atomic_path
from lib.errors import UserError

log = logging.getLogger(__name__)

GENERATOR = "blcf-demo"
VERSION = 1
PARAMS_FILE = "demo_params.json"
GT_FILE = "gnd_demo.json"
JUNK_MIN_VISIBLE = 0.4  # fraction of the object's area that must be visible
JUNK_MIN_AREA = 0.02  # fraction of the image the visible object must cover
JPEG_QUALITY = 90

# random-stream tags: every image draws from its own seeded stream, so changing one count
# does not reshuffle the others
_OBJ, _VIEW, _QUERY, _JUNK, _DIST, _ORDER, _EXTRA = range(7)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


# --------------------------------------------------------------------------- drawing


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()


def _word(rng: np.random.Generator) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    n = int(rng.integers(3, 7))
    w = "".join(letters[i] for i in rng.integers(0, len(letters), n))
    return w + ("-" + str(int(rng.integers(10, 99))) if rng.random() < 0.5 else "")


def _colour(rng: np.random.Generator, muted: bool = False) -> tuple[int, int, int]:
    if muted:
        return tuple(int(v) for v in rng.integers(60, 190, 3))
    c = rng.integers(0, 256, 3)
    c[int(rng.integers(0, 3))] = int(rng.choice([0, 255]))  # at least one saturated channel
    return tuple(int(v) for v in c)


def _draw_shapes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int,
                 n: int, smin: float, smax: float, muted: bool) -> None:
    """Random ellipses, rectangles, polygons and thick lines."""
    side = min(w, h)
    for _ in range(n):
        kind = int(rng.integers(0, 4))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(smin, smax, 2) * side / 2
        col = _colour(rng, muted)
        if kind == 0:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=col)
        elif kind == 1:
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=col)
        elif kind == 2:
            k = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = rng.uniform(0.5, 1.0, k)
            pts = [(float(cx + rx * r * np.cos(a)), float(cy + ry * r * np.sin(a)))
                   for a, r in zip(ang, rad)]
            draw.polygon(pts, fill=col)
        else:
            draw.line([cx - rx, cy - ry, cx + rx, cy + ry], fill=col,
                      width=max(2, int(side * rng.uniform(0.01, 0.04))))


def _pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A background pattern: stripes, checkerboard, rings or a gradient, in two colours."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = int(rng.integers(0, 4))
    period = rng.uniform(14, 48)
    if kind == 0:
        a = rng.uniform(0, np.pi)
        t = (np.sin((x * np.cos(a) + y * np.sin(a)) * 2 * np.pi / period) > 0).astype(np.float32)
    elif kind == 1:
        t = ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    elif kind == 2:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        t = (np.sin(np.hypot(x - cx, y - cy) * 2 * np.pi / period) > 0).astype(np.float32)
    else:
        a = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(a) + y * np.sin(a)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    c0 = np.array(_colour(rng), np.float32)
    c1 = np.array(_colour(rng, muted=True), np.float32)
    return (c0 * t[..., None] + c1 * (1 - t[..., None])).astype(np.uint8)


def _object_texture(rng: np.random.Generator, long_side: int = 400) -> Image.Image:
    """One object: pattern, shapes, one or two lines of text, a frame."""
    short = int(long_side * rng.uniform(0.62, 1.0))
    w, h = (long_side, short) if rng.random() < 0.5 else (short, long_side)
    img = Image.fromarray(_pattern(rng, h, w))
    draw = ImageDraw.Draw(img)
    _draw_shapes(draw, rng, w, h, int(rng.integers(7, 13)), 0.1, 0.45, muted=False)
    for _ in range(int(rng.integers(1, 3))):
        font = _font(int(rng.integers(34, 60)))
        text = _word(rng)
        x, y = rng.uniform(0.03, 0.4) * w, rng.uniform(0.05, 0.8) * h
        x0, y0, x1, y1 = draw.textbbox((x, y), text, font=font)
        draw.rectangle([x0 - 6, y0 - 6, x1 + 6, y1 + 6], fill=_colour(rng, muted=True))
        draw.text((x, y), text, font=font, fill=_colour(rng))
    bw = max(4, long_side // 60)
    draw.rectangle([0, 0, w - 1, h - 1], outline=_colour(rng), width=bw)
    return img


def _clutter(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A cluttered background: a smooth colour field with muted shapes and small text."""
    field = rng.uniform(40, 215, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3))
    img = Image.fromarray(field.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    _draw_shapes(draw, rng, w, h, int(rng.integers(15, 35)), 0.04, 0.3, muted=True)
    for _ in range(int(rng.integers(0, 4))):
        draw.text((float(rng.uniform(0, w * 0.8)), float(rng.uniform(0, h * 0.9))), _word(rng),
                  font=_font(int(rng.integers(12, 24))), fill=_colour(rng, muted=True))
    return img.filter(ImageFilter.BoxBlur(float(rng.uniform(0.0, 1.5))))


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """8 coefficients of the projective map src -> dst (4 point pairs), as PIL expects."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(src, dst)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * i], b[2 * i + 1] = u, v
    return np.linalg.solve(a, b)


def _quad_area(q: np.ndarray) -> float:
    x, y = q[:, 0], q[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


@dataclass
class _View:
    image: Image.Image
    visible: float  # visible fraction of the object's projected area
    area: float  # visible object pixels / image pixels
    bbox: tuple[int, int, int, int] | None  # box of the visible object, x2/y2 exclusive


def _render(obj: Image.Image | None, rng: np.random.Generator, size: tuple[int, int],
            scale: tuple[float, float], occlusion: tuple[float, float], p_occlude: float
            ) -> _View:
    """Place ``obj`` in a clutter scene: warp, light, occlude, add noise."""
    h, w = size
    scene = _clutter(rng, h, w)
    visible_frac, area, bbox = 0.0, 0.0, None
    if obj is not None:
        ow, oh = obj.size
        s = rng.uniform(*scale) * min(h, w) / max(ow, oh)
        tw, th = ow * s, oh * s
        cx = rng.uniform(min(tw / 2, w / 2) * 0.8, w - min(tw / 2, w / 2) * 0.8)
        cy = rng.uniform(min(th / 2, h / 2) * 0.8, h - min(th / 2, h / 2) * 0.8)
        rect = np.array([[-tw / 2, -th / 2], [tw / 2, -th / 2], [tw / 2, th / 2],
                         [-tw / 2, th / 2]])
        ang = np.deg2rad(rng.uniform(-20, 20))
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        quad = rect @ rot.T + rng.uniform(-0.15, 0.15, (4, 2)) * [tw, th] + [cx, cy]
        src = np.array([[0, 0], [ow, 0], [ow, oh], [0, oh]], np.float64)
        coeffs = _homography(quad, src)  # PIL maps output pixels back to input pixels
        rgba = obj.convert("RGBA")
        warped = rgba.transform((w, h), Image.Transform.PERSPECTIVE, tuple(coeffs),
                                Image.Resampling.BICUBIC, fillcolor=(0, 0, 0, 0))
        scene.paste(warped, (0, 0), warped)
        mask = np.asarray(warped.getchannel("A")) > 127
        if rng.random() < p_occlude:
            ys, xs = np.nonzero(mask)
            if xs.size:
                x1, x2, y1, y2 = xs.min(), xs.max(), ys.min(), ys.max()
                f = rng.uniform(*occlusion)
                r = rng.uniform(0.6, 1.6)
                ow_ = (x2 - x1) * min(np.sqrt(f) * r, 1.0)
                oh_ = (y2 - y1) * min(np.sqrt(f) / r, 1.0)
                ox = rng.uniform(x1 - ow_ * 0.2, x2 - ow_ * 0.8)
                oy = rng.uniform(y1 - oh_ * 0.2, y2 - oh_ * 0.8)
                occ = Image.new("L", (w, h), 0)
                ImageDraw.Draw(occ).rectangle([ox, oy, ox + ow_, oy + oh_], fill=255)
                scene.paste(_clutter(rng, h, w), (0, 0), occ)
                mask &= np.asarray(occ) == 0
        n_vis = int(mask.sum())
        visible_frac = n_vis / max(_quad_area(quad), 1.0)
        area = n_vis / float(h * w)
        if n_vis:
            ys, xs = np.nonzero(mask)
            bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    # lighting: global gain, a linear illumination gradient, a colour cast, noise
    img = np.asarray(scene, np.float32)
    xx = np.arange(w, dtype=np.float32)[None, :] / w - 0.5
    yy = np.arange(h, dtype=np.float32)[:, None] / h - 0.5
    grad = 1 + np.float32(rng.uniform(-0.35, 0.35)) * xx + np.float32(rng.uniform(-0.35, 0.35)) * yy
    gain = (rng.uniform(0.6, 1.3) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    img = img * grad[..., None] * gain + np.float32(rng.uniform(-20, 20))
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0, 6))
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return _View(out, float(visible_frac), float(area), bbox)


# --------------------------------------------------------------------------- the set


def _size(rng: np.random.Generator, image_size: tuple[int, int]) -> tuple[int, int]:
    """Mixed orientation: about a third of the photos are portrait."""
    a, b = sorted(image_size)
    return (b, a) if rng.random() < 1 / 3 else (a, b)


def _params(seed: int, n_objects: int, views_per_object: int, n_distractors: int,
            image_size: tuple[int, int]) -> dict:
    return {"generator": GENERATOR, "version": VERSION, "seed": seed, "n_objects": n_objects,
            "views_per_object": views_per_object, "n_distractors": n_distractors,
            "image_size": list(image_size)}


def is_complete(out: Path, params: dict) -> bool:
    """True when ``out`` holds a finished set made with exactly ``params``."""
    try:
        rec = json.loads((out / PARAMS_FILE).read_text(encoding="utf-8"))
        gt = json.loads((out / GT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if rec.get("params") != params:
        return False
    return (all((out / "images" / f"{i}.jpg").is_file() for i in gt["imlist"])
            and all((out / "queries" / f"{q}.jpg").is_file() for q in gt["qimlist"]))


def generate(out: Path, seed: int = 0, n_objects: int = 30, views_per_object: int = 4,
             n_distractors: int = 40, image_size: tuple[int, int] = (480, 640)) -> Path:
    """Write the demo set to ``out`` (replacing an older demo set there) and return the
    ground-truth JSON path. Does nothing when ``out`` already holds the same set."""
    out = Path(out)
    if n_objects < 1 or views_per_object < 1 or n_distractors < 0:
        raise UserError("demo: need n_objects >= 1, views_per_object >= 1, n_distractors >= 0")
    if min(image_size) < 64:
        raise UserError(f"demo: image_size {list(image_size)} is too small (min side 64)")
    params = _params(seed, n_objects, views_per_object, n_distractors, tuple(image_size))
    if is_complete(out, params):
        log.debug("%s already holds the demo set for these parameters", out)
        return out / GT_FILE
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / PARAMS_FILE).exists())):
        raise UserError(f"{out}: exists and is not a demo set; refusing to overwrite it")
    t0 = time.perf_counter()
    objects = [_object_texture(_rng(seed, _OBJ, k)) for k in range(n_objects)]
    # database items: (object or None, kind, index); kind in view / junk / clutter / other
    items: list[tuple[int | None, str, int]] = []
    for k in range(n_objects):
        items += [(k, "view", v) for v in range(views_per_object)]
        if _rng(seed, _EXTRA, k).random() < 1 / 3:
            items.append((k, "junk", 0))
    items += [(None, "clutter" if j % 2 == 0 else "other", j) for j in range(n_distractors)]
    order = _rng(seed, _ORDER).permutation(len(items))
    width = len(str(len(items) - 1))
    with atomic_path(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "queries").mkdir()
        info: dict[str, dict] = {}
        ok: list[list[int]] = [[] for _ in range(n_objects)]
        junk: list[list[int]] = [[] for _ in range(n_objects)]
        imlist = []
        for pos, i in enumerate(order):
            k, kind, j = items[i]
            if kind == "view":
                rng = _rng(seed, _VIEW, k, j)
                v = _render(objects[k], rng, _size(rng, image_size), (0.45, 0.9), (0.05, 0.35),
                            0.5)
            elif kind == "junk":
                rng = _rng(seed, _JUNK, k)
                tiny = rng.random() < 0.5
                v = _render(objects[k], rng, _size(rng, image_size),
                            (0.1, 0.16) if tiny else (0.5, 0.8),
                            (0.0, 0.0) if tiny else (0.75, 0.95), 0.0 if tiny else 1.0)
            else:
                rng = _rng(seed, _DIST, j)
                other = _object_texture(rng) if kind == "other" else None
                v = _render(other, rng, _size(rng, image_size), (0.45, 0.9), (0.05, 0.35), 0.3)
            name = f"img_{pos:0{width}d}"
            v.image.save(tmp / "images" / f"{name}.jpg", quality=JPEG_QUALITY)
            imlist.append(name)
            if k is not None:
                is_junk = v.visible < JUNK_MIN_VISIBLE or v.area < JUNK_MIN_AREA
                (junk if is_junk else ok)[k].append(pos)
            info[name] = {"object": k, "kind": kind, "visible": round(v.visible, 3),
                          "area": round(v.area, 4), "size": [v.image.height, v.image.width]}
        qwidth = len(str(n_objects - 1))
        qimlist, gnd = [], []
        for k in range(n_objects):
            rng = _rng(seed, _QUERY, k)
            v = _render(objects[k], rng, _size(rng, image_size), (0.5, 0.8), (0.05, 0.15), 0.25)
            name = f"query_{k:0{qwidth}d}"
            v.image.save(tmp / "queries" / f"{name}.jpg", quality=JPEG_QUALITY)
            qimlist.append(name)
            gnd.append({"bbx": list(v.bbox) if v.bbox else None, "ok": sorted(ok[k]),
                        "junk": sorted(junk[k])})
            info[name] = {"object": k, "kind": "query", "visible": round(v.visible, 3),
                          "area": round(v.area, 4), "size": [v.image.height, v.image.width]}
        (tmp / GT_FILE).write_text(json.dumps({"imlist": imlist, "qimlist": qimlist,
                                               "gnd": gnd}, indent=1) + "\n", encoding="utf-8")
        rules = {"junk_min_visible": JUNK_MIN_VISIBLE, "junk_min_area": JUNK_MIN_AREA}
        (tmp / PARAMS_FILE).write_text(json.dumps(
            {"params": params, "junk_rule": rules, "images": info}, indent=1, sort_keys=True)
            + "\n", encoding="utf-8")
    log.debug("demo set written to %s in %.1f s", out, time.perf_counter() - t0)
    return out / GT_FILE


def main() -> None:
    from lib.cli import run_main, setup_logging

    p = argparse.ArgumentParser(
        prog="datasets/demo.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__)
    p.add_argument("--out", type=Path, default=Path("data/demo"),
                   help="output folder (default data/demo); replaced atomically")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--objects", type=int, default=30, help="objects = queries (default 30)")
    p.add_argument("--views", type=int, default=4, help="database views per object (default 4)")
    p.add_argument("--distractors", type=int, default=40,
                   help="distractor photos: clutter only or an unqueried object (default 40)")
    p.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"),
                   help="landscape photo size; portrait photos use W, H (default 480 640)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    args = p.parse_args()
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        params = _params(args.seed, args.objects, args.views, args.distractors,
                         tuple(args.size))
        done = is_complete(args.out, params)
        t0 = time.perf_counter()
        gt_path = generate(args.out, args.seed, args.objects, args.views, args.distractors,
                           tuple(args.size))
        gt = json.loads(gt_path.read_text(encoding="utf-8"))
        n_junk = sum(len(g["junk"]) for g in gt["gnd"])
        what = "up to date" if done else f"generated in {time.perf_counter() - t0:.1f} s"
        print(f"demo set {what}: {len(gt['imlist'])} database images ({args.distractors} "
              f"distractors, {n_junk} junk views), {len(gt['qimlist'])} queries -> {gt_path}")
        return 0

    run_main(body, "demo")


if __name__ == "__main__":
    main()
