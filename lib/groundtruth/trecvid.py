"""TRECVid INS 2013 subset ("INS 23k", spec §4.3): qrels, keyframes, query images + masks.

- qrels (``path_gt``): one judgement a line, ``<topic> 0 <shot> <rel>``; a shot is
  relevant to a topic when ``rel`` is 1.
- keyframes: every image under ``path_images``; ids are ``<shot folder>/<frame>``.
  **Shot rule** (spec §4.3): the shot of a keyframe is the first two ``_``-separated
  fields of the frame's basename (``shot1234_56_RKF`` -> ``shot1234_56``); a basename
  with fewer than two fields takes its folder's name.
- queries: ``<topic>.<k>.src.<ext>`` with the object mask ``<topic>.<k>.mask.<ext>``,
  looked up in the queries folder (``path_queries`` when given, else
  ``<folder of the qrels>/queries``). Each query image is its own query, named
  ``<topic>_<k>`` (the original's list name); its box is the mask's bounding box.

Evaluation is shot-level (lib/evaluation/metrics.py); ``Query.positives`` holds the keyframes of
the relevant shots so keyframe-level tools (the report) work too.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

from lib.errors import UserError
from lib.groundtruth.common import (
    IMAGE_EXTENSIONS,
    GroundTruth,
    Query,
    list_images,
    read_gt_text,
)
from lib.groundtruth.loader import register

log = logging.getLogger(__name__)

_QUERY = re.compile(r"^(?P<topic>[^.]+)\.(?P<k>\d+)\.src$")


def shot_of(keyframe_id: str) -> str:
    """Shot id of a keyframe id (rule in the module docstring)."""
    folder, _, base = keyframe_id.rpartition("/")
    fields = base.split("_")
    if len(fields) >= 2 and all(fields[:2]):
        return "_".join(fields[:2])
    if folder:
        return folder.rsplit("/", 1)[-1]
    raise UserError(f"keyframe '{keyframe_id}': cannot tell its shot (name is not "
                    "<shot>_<n>_... and it is not in a shot folder)")


def read_qrels(path: Path) -> dict[str, frozenset[str]]:
    """Topic -> relevant shots, from ``topic 0 shot rel`` lines (topics in file order)."""
    if not Path(path).exists() or Path(path).is_dir():
        raise UserError(f"{path}: qrels file not found")
    lines = read_gt_text(Path(path), "qrels file").splitlines()
    out: dict[str, set[str]] = {}
    for n, ln in enumerate(lines, 1):
        parts = ln.split()
        if not parts:
            continue
        if len(parts) != 4 or parts[3] not in ("0", "1"):
            raise UserError(f"{path}, line {n}: expected 'topic 0 shot rel' with rel 0 or 1, "
                            f"got {ln!r}")
        rel = out.setdefault(parts[0], set())
        if parts[3] == "1":
            rel.add(parts[2])
    if not out:
        raise UserError(f"{path}: no judgements")
    return {t: frozenset(s) for t, s in out.items()}


def _mask_box(mask: Path) -> tuple[float, float, float, float]:
    with Image.open(mask) as im:
        m = np.asarray(im.convert("L")) > 0
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        raise UserError(f"{mask}: the query mask is empty")
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _topic_key(t: str) -> tuple[int, int | str]:
    return (0, int(t)) if t.isdigit() else (1, t)


@register("trecvid")
def read_trecvid(path_gt: Path, path_images: Path, name: str,
                 path_queries: Path | None = None) -> GroundTruth:
    """TRECVid INS 2013 ground truth (see the module docstring for the layout)."""
    path_gt = Path(path_gt)
    relevant = read_qrels(path_gt)
    qdir = Path(path_queries) if path_queries is not None else path_gt.parent / "queries"
    if not qdir.is_dir():
        raise UserError(f"{qdir}: TRECVid query folder not found (set path_queries)")
    db_ids = list_images(path_images)
    shots = {k: shot_of(k) for k in db_ids}
    by_shot: dict[str, list[str]] = {}
    for k, s in shots.items():
        by_shot.setdefault(s, []).append(k)
    found: dict[str, list[tuple[int, Path]]] = {}
    for f in qdir.iterdir():
        if f.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        m = _QUERY.match(f.name[: -len(f.suffix)])
        if m and m["topic"] in relevant:
            found.setdefault(m["topic"], []).append((int(m["k"]), f))
    queries, relevant_shots = [], {}
    for topic in sorted(relevant, key=_topic_key):
        if topic not in found:
            log.warning("%s: topic %s has no query image in %s", path_gt, topic, qdir)
            continue
        for k, src in sorted(found[topic]):
            stem = f"{topic}.{k}"
            masks = [p for p in qdir.glob(f"{stem}.mask.*")
                     if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not masks:
                raise UserError(f"{src}: mask {stem}.mask.png not found in {qdir}")
            qname = f"{topic}_{k}"
            rel = relevant[topic]
            pos = frozenset(kf for s in rel for kf in by_shot.get(s, ()))
            queries.append(Query(qname, src.name[: -len(src.suffix)], _mask_box(masks[0]),
                                 pos, frozenset(), mask=masks[0], topic=topic))
            relevant_shots[qname] = rel
    if not queries:
        raise UserError(f"{qdir}: no query images <topic>.<k>.src.png for the qrels topics")
    missing = sum(len(r - by_shot.keys()) for r in relevant.values())
    if missing:
        log.warning("%s: %d relevant shots have no keyframe under %s (never retrieved)",
                    path_gt, missing, path_images)
    return GroundTruth(name, "trecvid", db_ids, queries, shots=shots,
                       relevant_shots=relevant_shots)


__all__ = ["read_qrels", "read_trecvid", "shot_of"]
