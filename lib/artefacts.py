"""Artefact bookkeeping shared by every step: atomic writes, provenance metadata,
compatibility checks between steps, and the output-folder lock.

Contract (see DESIGN.md): every artefact carries a JSON metadata record. A step that
reads an artefact compares the fields that matter with what its own settings ask for
and refuses with the field named (:class:`ArtefactMismatchError`) instead of producing
silently wrong numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lib.errors import ArtefactMismatchError, LockedError, UserError

# --------------------------------------------------------------------------- atomic I/O


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    Works for files and folders. A crash or Ctrl-C inside the block leaves ``path``
    untouched (either absent or the previous complete version)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        _remove(tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def save_npy_atomic(path: str | os.PathLike, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def load_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """``np.load`` without pickles; a truncated or foreign file is a UserError naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: unreadable or truncated .npy file ({e})") from None


def sidecar(path: str | os.PathLike) -> Path:
    """The JSON metadata file that travels with an artefact: ``<stem>.json``."""
    return Path(path).with_suffix(".json")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def json_default(o: Any) -> Any:
    """``json.dumps`` default for numpy scalars/arrays and paths."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --------------------------------------------------------------------------- provenance


def canonical_hash(obj: Any, length: int = 16) -> str:
    """Stable short hash of a JSON-able object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def library_versions() -> dict[str, str]:
    """Versions of the libraries that can change numbers, for the metadata record."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "torchvision", "faiss", "sklearn", "lmdb", "PIL"):
        with contextlib.suppress(Exception):
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
    return out


def check_fields(
    expected: Mapping[str, Any],
    found: Mapping[str, Any],
    fields: Iterable[str],
    what: str,
    hint: str = "",
) -> None:
    """Raise ArtefactMismatchError naming the first field where ``found`` differs.

    ``what`` names the artefact (its path), ``hint`` says which step to rerun."""
    for f in fields:
        e, g = _norm(expected.get(f)), _norm(found.get(f, "<missing>"))
        if e != g:
            tail = f"; {hint}" if hint else ""
            raise ArtefactMismatchError(
                f"{what}: field '{f}' is {g!r} but the settings ask for {e!r}{tail}"
            )


def _norm(v: Any) -> Any:
    # JSON round trips turn tuples into lists; compare structurally.
    return json.loads(json.dumps(v, sort_keys=True, default=json_default))


# --------------------------------------------------------------------------- locking


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, step: str) -> Iterator[None]:
    """Hold ``<folder>/.lock`` (holder's pid and step) for the duration of the block.

    A second run pointed at the same folder refuses with LockedError naming the
    holder. A lock left by a dead process (SIGKILL, power cut) is taken over."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    me = f"{os.getpid()} {step}\n"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is not None and _pid_alive(holder[0]) and holder[0] != os.getpid():
                raise LockedError(
                    f"{folder}: in use by another run (pid {holder[0]}, step {holder[1]}); "
                    f"wait for it or remove {lock} if that process is gone"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:  # pragma: no cover - lost a race twice
        raise LockedError(f"{folder}: could not take the lock {lock}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _read_lock(lock) == (os.getpid(), step):
                lock.unlink()


def _read_lock(lock: Path) -> tuple[int, str] | None:
    try:
        pid, _, step = lock.read_text().strip().partition(" ")
        return int(pid), step
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


