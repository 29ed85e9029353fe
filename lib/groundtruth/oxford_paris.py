"""Oxford5k / Paris6k ``gt_files`` (spec §1.8): ``<landmark>_<k>_{query,good,ok,junk}.txt``.

The query file holds one line ``<image> x1 y1 x2 y2`` (floats, pixels of the original
image); Oxford prefixes the image with ``oxc1_``, Paris does not. Positives = good ∪ ok,
junk is ignored by the evaluation (spec §4.1). The database is every image file under
``path_images``, sorted: that order breaks ties in the rankings.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from lib.errors import UserError
from lib.groundtruth.common import GroundTruth, Query, list_images, read_gt_text
from lib.groundtruth.loader import register

log = logging.getLogger(__name__)

OXFORD_PREFIX = "oxc1_"
_TOPIC = re.compile(r"^(?P<landmark>.+)_(?P<k>\d+)$")


def _read_ids(path: Path) -> list[str]:
    text = read_gt_text(path, "ground-truth file")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def parse_query_line(path: Path) -> tuple[str, tuple[float, float, float, float]]:
    """Image id (``oxc1_`` stripped) and box of one ``*_query.txt`` file."""
    lines = _read_ids(path)
    if len(lines) != 1:
        raise UserError(f"{path}: expected one line '<image> x1 y1 x2 y2', got {len(lines)}")
    parts = lines[0].split()
    try:
        x1, y1, x2, y2 = (float(v) for v in parts[1:])
    except ValueError:
        raise UserError(f"{path}, line 1: expected '<image> x1 y1 x2 y2', got "
                        f"{lines[0]!r}") from None
    if not (x2 > x1 and y2 > y1):
        raise UserError(f"{path}, line 1: box {x1} {y1} {x2} {y2} has no area")
    image = parts[0]
    if image.startswith(OXFORD_PREFIX):
        image = image[len(OXFORD_PREFIX):]
    return image, (x1, y1, x2, y2)


def read_gt_files(path_gt: Path, path_images: Path, name: str) -> GroundTruth:
    """All ``*_query.txt`` topics under ``path_gt``, ordered by landmark then k."""
    path_gt = Path(path_gt)
    if not path_gt.is_dir():
        raise UserError(f"{path_gt}: expected the gt_files folder (<topic>_query.txt ...)")
    topics = []
    for f in path_gt.glob("*_query.txt"):
        topic = f.name[: -len("_query.txt")]
        m = _TOPIC.match(topic)
        if m is None:
            raise UserError(f"{f}: name is not <landmark>_<k>_query.txt")
        topics.append((m["landmark"], int(m["k"]), topic))
    if not topics:
        raise UserError(f"{path_gt}: no *_query.txt files")
    topics.sort()
    db_ids = list_images(path_images)
    known = set(db_ids)
    queries = []
    unknown = 0
    for landmark, _, topic in topics:
        image, box = parse_query_line(path_gt / f"{topic}_query.txt")
        good = _read_ids(path_gt / f"{topic}_good.txt")
        ok = _read_ids(path_gt / f"{topic}_ok.txt")
        junk = _read_ids(path_gt / f"{topic}_junk.txt")
        pos = frozenset(good) | frozenset(ok)
        unknown += len((pos | frozenset(junk)) - known)
        queries.append(Query(topic, image, box, pos, frozenset(junk), topic=landmark))
    if unknown:
        log.warning("%s: %d judged images are not under %s (they count as never retrieved)",
                    path_gt, unknown, path_images)
    return GroundTruth(name, "oxford", db_ids, queries)


@register("oxford")
def read_oxford(path_gt: Path, path_images: Path, name: str) -> GroundTruth:
    """Oxford5k ``gt_files_170407`` (query lines carry ``oxc1_``)."""
    return read_gt_files(path_gt, path_images, name)


@register("paris")
def read_paris(path_gt: Path, path_images: Path, name: str) -> GroundTruth:
    """Paris6k ``gt_data`` (same layout, no prefix)."""
    return read_gt_files(path_gt, path_images, name)


__all__ = ["OXFORD_PREFIX", "parse_query_line", "read_gt_files", "read_oxford", "read_paris"]
