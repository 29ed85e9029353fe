"""The one ground-truth object every reader produces, and image-file lookup.

Image ids are paths relative to the image root, without extension, with '/' separators
(``all_souls_000013``, ``Canon/001``). They key every store and fill every ranking list.
The database order (``GroundTruth.db_ids``) is the order ties are broken in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lib.artefacts import read_small_file, utf8_text
from lib.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

# a ground-truth file larger than this is refused before it is read
MAX_GT_BYTES = 2**30


def read_gt_bytes(path: Path, what: str = "ground-truth file") -> bytes:
    """Content of a ground-truth file: a regular file of at most :data:`MAX_GT_BYTES`
    (:func:`lib.artefacts.read_small_file`)."""
    return read_small_file(path, what, MAX_GT_BYTES, kind="ground-truth file")


def read_gt_text(path: Path, what: str = "ground-truth file") -> str:
    """:func:`read_gt_bytes` decoded as UTF-8 (UserError when it is not)."""
    return utf8_text(read_gt_bytes(path, what), path, what)


def unsafe_id_reason(image_id: object) -> str | None:
    """Why ``image_id`` cannot name a file inside its root (None when it can): ids are
    relative '/'-separated paths without '.', '..' or empty parts."""
    if not isinstance(image_id, str):
        return f"is a {type(image_id).__name__}, not a string"
    if not image_id:
        return "is empty"
    if "\0" in image_id:
        return "contains a NUL character"
    if image_id.startswith("/"):
        return "is an absolute path"
    parts = image_id.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' part (it must stay inside its folder)"
    return None


def check_id(image_id: object, what: str) -> None:
    """UserError naming ``image_id`` (``what``: where it comes from) when it would
    resolve outside its root."""
    why = unsafe_id_reason(image_id)
    if why is not None:
        raise UserError(f"{what} {image_id!r} {why}")


@dataclass
class Query:
    """One query: its name (``lists/<name>.txt``), its image and box, its judgements.

    ``positives``/``junk`` are the sets used by the plain (Oxford rule) evaluation.
    Revisited queries also keep ``easy``/``hard`` (with ``junk`` the original junk) so
    Easy/Medium/Hard can be derived (field_notes §4)."""

    name: str
    image: str  # image id under the queries root
    bbox: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in pixels
    positives: frozenset[str] = frozenset()
    junk: frozenset[str] = frozenset()
    easy: frozenset[str] | None = None
    hard: frozenset[str] | None = None
    mask: Path | None = None  # TRECVid: binary mask image of the object
    topic: str | None = None  # Oxford/Paris landmark or TRECVid topic, for per-topic means


@dataclass
class GroundTruth:
    """Database ids, queries and judgements of one benchmark.

    ``protocol``: ``oxford`` (Oxford5k/Paris6k rule, per-landmark means), ``revisited``
    (Easy/Medium/Hard, mP@k), ``generic`` (plain mAP) or ``trecvid`` (shot-level AP;
    ``shots`` maps keyframe id -> shot id and ``relevant_shots`` query name -> shots)."""

    name: str
    protocol: str
    db_ids: list[str]
    queries: list[Query]
    shots: dict[str, str] | None = None
    relevant_shots: dict[str, frozenset[str]] | None = None
    extra: dict = field(default_factory=dict)

    def query(self, name: str) -> Query:
        for q in self.queries:
            if q.name == name:
                return q
        raise UserError(f"ground truth {self.name}: unknown query '{name}'")


def list_images(root: Path, prefix: str = "") -> list[str]:
    """All image ids under ``root`` (recursive), sorted; ``prefix`` is prepended."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found")
    ids = []
    for p in root.rglob("*"):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            ids.append(prefix + p.relative_to(root).with_suffix("").as_posix())
    ids.sort()
    return ids


def find_image(root: Path, image_id: str) -> Path:
    """The file of ``image_id`` under ``root`` (any known extension, either case). An id
    that would leave ``root`` (absolute, '..') is refused."""
    check_id(image_id, f"image id under {root}:")
    base = Path(root) / image_id
    for ext in IMAGE_EXTENSIONS:
        for e in (ext, ext.upper()):
            p = base.with_name(base.name + e)
            if p.is_file():
                return p
    if base.is_file():
        return base
    raise UserError(f"image '{image_id}' not found under {root}")
