"""Class-labelled training image lists (the input of T_train_triplet and clean_noisy).

Format (JSON, UTF-8)::

    {"root": "images",                     # optional; relative = to this JSON's folder
     "images": [{"path": "a/1.jpg", "class": "eiffel"}, ...],
     "removed": [...], "report": {...}}    # optional, written by datasets/clean_noisy.py

``path`` is relative to ``root`` (or absolute); ``class`` is any string or integer
(a landmark or product id, like the cleaned Landmarks set of Gordo et al.). Entries keep
their order; extra keys in an entry are kept and written back unchanged.

Why a reader of our own: a malformed list should stop with one line naming the file
and the entry, before hours of training start.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.artefacts import read_json, write_json_atomic
from lib.errors import UserError


@dataclass
class TrainingSet:
    root: Path
    paths: list[str]  # as written in the file (relative to root, or absolute)
    classes: list[str]
    extra: list[dict[str, Any]] = field(default_factory=list)  # other keys per entry
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def file(self, i: int) -> Path:
        """The image file of entry ``i``."""
        p = Path(self.paths[i])
        return p if p.is_absolute() else self.root / p

    def class_sizes(self) -> Counter:
        return Counter(self.classes)

    def subset(self, keep: list[int]) -> TrainingSet:
        return TrainingSet(self.root, [self.paths[i] for i in keep],
                           [self.classes[i] for i in keep],
                           [self.extra[i] for i in keep] if self.extra else [], self.source)


def read_training_json(path: str | Path, check_files: bool = True) -> TrainingSet:
    """Read and validate a training list; ``check_files``: every image must exist."""
    path = Path(path)
    data = read_json(path, "training list")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: expected an object with a list 'images'")
    root_raw = data.get("root", ".")
    if not isinstance(root_raw, str):
        raise UserError(f"{path}: field 'root' must be a path string")
    root = Path(root_raw)
    root = root if root.is_absolute() else (path.parent / root).resolve()
    paths, classes, extra = [], [], []
    for i, e in enumerate(data["images"]):
        if not isinstance(e, dict) or not isinstance(e.get("path"), str) \
                or not isinstance(e.get("class"), (str, int)) or isinstance(e.get("class"), bool):
            raise UserError(f"{path}: images[{i}] needs a string 'path' and a string or "
                            f"integer 'class', got {e!r}")
        paths.append(e["path"])
        classes.append(str(e["class"]))
        extra.append({k: v for k, v in e.items() if k not in ("path", "class")})
    if not paths:
        raise UserError(f"{path}: 'images' is empty")
    ts = TrainingSet(root, paths, classes, extra, path)
    if check_files:
        missing = [p for i, p in enumerate(paths) if not ts.file(i).is_file()]
        if missing:
            raise UserError(f"{path}: {len(missing)} image(s) not found under {root}, first: "
                            f"'{missing[0]}'")
    return ts


def write_training_json(path: str | Path, ts: TrainingSet,
                        extra_top: dict[str, Any] | None = None) -> None:
    """Write ``ts`` atomically; ``root`` is stored relative to the file's folder when it
    lies below it (so the pair can be moved together)."""
    path = Path(path)
    try:
        root = Path(ts.root).resolve().relative_to(path.parent.resolve()).as_posix() or "."
    except ValueError:
        root = str(Path(ts.root).resolve())
    images = [{"path": p, "class": c, **(ts.extra[i] if ts.extra else {})}
              for i, (p, c) in enumerate(zip(ts.paths, ts.classes))]
    write_json_atomic(path, {"root": root, "images": images, **(extra_top or {})})
