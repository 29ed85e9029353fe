"""The one ground-truth object every reader produces, and image-file lookup.

Image ids are paths relative to the image root, without extension, with '/' separators
(``all_souls_000013``, ``Canon/001``). They key every store and fill every ranking list.
The database order (``GroundTruth.db_ids``) is the order ties are broken in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lib.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


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
    """The file of ``image_id`` under ``root`` (any known extension, either case)."""
    base = Path(root) / image_id
    for ext in IMAGE_EXTENSIONS:
        for e in (ext, ext.upper()):
            p = base.with_name(base.name + e)
            if p.is_file():
                return p
    if base.is_file():
        return base
    raise UserError(f"image '{image_id}' not found under {root}")
