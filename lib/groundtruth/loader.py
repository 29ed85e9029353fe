"""Load a dataset's ground truth from its settings, whatever the benchmark format.

``load_ground_truth(settings)`` dispatches on ``gt_format`` and returns the common
:class:`~lib.groundtruth.common.GroundTruth`; ``image_path`` maps an image id to its file
(distractor ids, prefixed ``distractors/``, live under ``path_distractors``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lib.errors import UserError
from lib.groundtruth.common import (
    GroundTruth,
    Query,
    find_image,
    list_images,
    read_gt_text,
    unsafe_id_reason,
)

DISTRACTOR_PREFIX = "distractors/"

# the keys of a ``gnd`` entry in the revisited layout (generic JSON and the revisited
# pickles): any other key is refused, so that a misspelt judgement ("positives" for
# "ok") is not read as a query without positives
GND_KEYS = ("ok", "junk", "bbx", "easy", "hard")

log = logging.getLogger(__name__)

# gt_format -> reader(path_gt, path_images, name) -> GroundTruth. Other modules register
# their readers here (oxford_paris.py, revisited.py and trecvid.py in this package).
READERS: dict[str, Callable[[Path, Path, str], GroundTruth]] = {}


def register(fmt: str):
    def deco(fn):
        READERS[fmt] = fn
        return fn

    return deco


def _import_readers() -> None:
    # imported lazily so that a reader module with a missing optional piece does not
    # break the others
    import importlib

    for mod in ("lib.groundtruth.oxford_paris", "lib.groundtruth.revisited",
                "lib.groundtruth.trecvid"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def load_ground_truth(settings: Mapping[str, Any]) -> GroundTruth:
    """The ground truth named by ``settings`` (gt_format, path_gt, path_images,
    path_distractors). Distractor ids are appended to ``db_ids`` after the dataset's own."""
    fmt = settings["gt_format"]
    if fmt not in READERS:
        _import_readers()
    if fmt not in READERS:
        raise UserError(f"gt_format '{fmt}': no reader available")
    args = (Path(settings["path_gt"]), Path(settings["path_images"]), str(settings["dataset"]))
    if fmt == "trecvid" and settings.get("path_queries"):
        # TRECVid queries (images + masks) live apart from the keyframes
        gt = READERS[fmt](*args, path_queries=Path(settings["path_queries"]))
    else:
        gt = READERS[fmt](*args)
    if settings.get("path_distractors"):
        extra = list_images(Path(settings["path_distractors"]), prefix=DISTRACTOR_PREFIX)
        gt.db_ids = gt.db_ids + extra
    check_ground_truth_ids(gt, args[0])
    return gt


def check_ground_truth_ids(gt: GroundTruth, source: Path) -> None:
    """Refuse (UserError naming the id) a database id, query image id or query name that
    would resolve outside its folder (absolute, '..'; query names become
    ``lists/<name>.txt``), and duplicate query names, before anything is computed."""
    for i in gt.db_ids:
        why = unsafe_id_reason(i)
        if why is not None:
            raise UserError(f"{source}: database image id {i!r} {why}")
    seen: set[str] = set()
    for q in gt.queries:
        for what, v in (("query name", q.name), ("query image id", q.image)):
            why = unsafe_id_reason(v)
            if why is not None:
                raise UserError(f"{source}: {what} {v!r} {why}")
        if q.name in seen:
            raise UserError(f"{source}: duplicate query name {q.name!r} (each query writes "
                            f"lists/<name>.txt; names must be unique)")
        seen.add(q.name)
        for v in (*q.positives, *q.junk):
            why = unsafe_id_reason(v)
            if why is not None:
                raise UserError(f"{source}: query {q.name!r}: judged image id {v!r} {why}")


def image_path(settings: Mapping[str, Any], image_id: str, query: bool = False) -> Path:
    """File of a database image (or, with ``query``, of a query image)."""
    if image_id.startswith(DISTRACTOR_PREFIX) and settings.get("path_distractors"):
        return find_image(Path(settings["path_distractors"]), image_id[len(DISTRACTOR_PREFIX):])
    root = (settings["path_queries"] or settings["path_images"]) if query else \
        settings["path_images"]
    return find_image(Path(root), image_id)


# --------------------------------------------------------------------------- generic JSON


def _bbox(v: Any, where: str) -> tuple[float, float, float, float] | None:
    if v is None:
        return None
    bad = UserError(f"{where}: bbx must be [x1, y1, x2, y2] of finite numbers, got {v!r}")
    if isinstance(v, (str, bytes, Mapping)):
        raise bad
    try:
        vals = list(v)
    except TypeError:
        raise bad from None
    if len(vals) != 4:
        raise bad
    coords = []
    for x in vals:
        # numbers only (numpy scalars included); not strings, not booleans
        if isinstance(x, (bool, str, bytes)) or type(x).__name__ == "bool_":
            raise bad
        try:
            f = float(x)
        except (TypeError, ValueError, OverflowError):
            raise bad from None
        if not math.isfinite(f):
            raise bad
        coords.append(f)
    x1, y1, x2, y2 = coords
    if not (x2 > x1 and y2 > y1):
        raise UserError(f"{where}: bbx {list(v)} has zero or negative area")
    return x1, y1, x2, y2


def read_revisited_layout(data: Mapping[str, Any], name: str, source: Path,
                          protocol: str) -> GroundTruth:
    """The revisited layout (``imlist``, ``qimlist``, ``gnd[i]`` with ``bbx`` and
    either ``ok``/``junk`` or ``easy``/``hard``/``junk``; 0-based indices into imlist)."""
    try:
        imlist = [str(x) for x in data["imlist"]]
        qimlist = [str(x) for x in data["qimlist"]]
        gnd = list(data["gnd"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{source}: missing or malformed field {e}") from None
    if len(gnd) != len(qimlist):
        raise UserError(f"{source}: {len(qimlist)} queries in qimlist but {len(gnd)} in gnd")
    n = len(imlist)

    def ids(g: Mapping[str, Any], key: str, i: int) -> frozenset[str]:
        vals = g.get(key)
        if vals is None:
            return frozenset()
        try:
            vals = list(vals)
        except TypeError:
            raise UserError(f"{source}: query {i} ({qimlist[i]}): '{key}' must be a list of "
                            f"indices, got {vals!r}") from None
        out = []
        for v in vals:
            try:
                j = int(v)
            except (TypeError, ValueError):
                raise UserError(f"{source}: query {i} ({qimlist[i]}): '{key}' holds {v!r}, "
                                "not an image index") from None
            if not 0 <= j < n:
                raise UserError(f"{source}: query {i} ({qimlist[i]}): '{key}' index {j} "
                                f"outside imlist (size {n})")
            out.append(imlist[j])
        return frozenset(out)

    queries = []
    for i, (qname, g) in enumerate(zip(qimlist, gnd)):
        if not isinstance(g, Mapping):
            raise UserError(f"{source}: gnd[{i}] is not an object")
        where = f"{source}: query {i} ({qname})"
        _check_gnd_keys(g, where)
        box = _bbox(g.get("bbx"), where)
        if "easy" in g or "hard" in g:
            easy, hard, junk = ids(g, "easy", i), ids(g, "hard", i), ids(g, "junk", i)
            # plain evaluation of a revisited query = the Medium protocol
            queries.append(Query(qname, qname, box, easy | hard, junk, easy=easy, hard=hard))
        else:
            queries.append(Query(qname, qname, box, ids(g, "ok", i), ids(g, "junk", i)))
    return GroundTruth(name, protocol, imlist, queries)


def _check_gnd_keys(g: Mapping[str, Any], where: str) -> None:
    """Refuse a key outside :data:`GND_KEYS`, with the closest valid one."""
    from lib.settings import did_you_mean

    for key in g:
        if key not in GND_KEYS:
            hint = did_you_mean(str(key), GND_KEYS) or f" (valid keys: {', '.join(GND_KEYS)})"
            raise UserError(f"{where}: unknown key {str(key)!r} in its gnd entry{hint}")
    if "ok" in g and ("easy" in g or "hard" in g):
        raise UserError(f"{where}: gnd entry mixes 'ok' with 'easy'/'hard'; use ok/junk or "
                        "easy/hard/junk")


def queries_without_positives(gt: GroundTruth) -> list[str]:
    """Names of the queries with no positive image (no AP: step E leaves them out of the
    mean)."""
    return [q.name for q in gt.queries if not q.positives]


def warn_without_positives(gt: GroundTruth, source: Any) -> list[str]:
    """One warning naming the queries without positives (the first ten, then a count);
    returns all of their names."""
    names = queries_without_positives(gt)
    if names:
        shown = ", ".join(repr(n) for n in names[:10])
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        log.warning("%s: %d of %d queries have no positives (%s%s): they get no AP and are "
                    "left out of the mAP", source, len(names), len(gt.queries), shown, more)
    return names


@register("generic")
def read_generic_json(path_gt: Path, path_images: Path, name: str) -> GroundTruth:
    """A JSON file in the revisited layout (the format is in docs/formats.md)."""
    if path_gt.is_dir():
        raise UserError(f"{path_gt}: gt_format 'generic' expects a JSON file, not a folder")
    text = read_gt_text(path_gt, "ground-truth JSON")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path_gt}: cannot read ground-truth JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{path_gt}: cannot read ground-truth JSON (nested too "
                        "deeply)") from None
    gt = read_revisited_layout(data, name, path_gt, "generic")
    if any(q.easy is not None for q in gt.queries):
        gt.protocol = "revisited"
    return gt


def check_images_exist(gt: GroundTruth, settings: Mapping[str, Any]) -> list[str]:
    """Ids listed in the ground truth whose file is missing (for a clear early error)."""
    missing = []
    for i in gt.db_ids:
        try:
            image_path(settings, i)
        except UserError:
            missing.append(i)
    return missing


__all__ = [
    "DISTRACTOR_PREFIX",
    "GND_KEYS",
    "READERS",
    "check_ground_truth_ids",
    "check_images_exist",
    "image_path",
    "list_images",
    "load_ground_truth",
    "queries_without_positives",
    "read_generic_json",
    "read_revisited_layout",
    "register",
    "warn_without_positives",
]
