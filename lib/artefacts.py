"""Artefact bookkeeping shared by every step: atomic writes, provenance metadata,
compatibility checks between steps, and the output-folder lock.

Contract (see DESIGN.md): every artefact carries a JSON metadata record. A step that
reads an artefact compares the fields that matter with what its own settings ask for
and refuses with the field named (:class:`ArtefactMismatchError`) instead of producing
silently wrong numbers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lib.errors import ArtefactMismatchError, LockedError, UserError, byte_size

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
    remove_dead_temporaries(path)
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


def remove_dead_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` siblings of ``path`` that
    :func:`atomic_path` left when its process was killed: only those whose pid is not a
    live process (a live writer's temporary is never touched; a pid reused by another
    live process keeps its leftover until that process is gone). Returns what it removed."""
    path = Path(path)
    removed = []
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            for kind in (".tmp-", ".old-"):
                prefix = f".{path.name}{kind}"
                if not p.name.startswith(prefix):
                    continue
                pid = p.name[len(prefix):]
                if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                    with contextlib.suppress(OSError):
                        _remove(p)
                        removed.append(p)
    return removed


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


# --------------------------------------------------------------------------- bounded reads


def read_small_file(path: str | os.PathLike, what: str, limit: int, *, kind: str | None = None,
                    error: type[UserError] = UserError, missing: str = "missing",
                    not_regular_hint: str = "") -> bytes:
    """Content of a small input file a user names (settings, ground truth), refused up
    front with one line (``error``) unless it is a regular file of at most ``limit``
    bytes: a device (``/dev/zero``) would be read until memory runs out, a FIFO would
    block forever. ``kind`` names the limit's file type in the message (default
    ``what``)."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: {what} {missing}")
    if not path.is_file():
        raise error(f"{path}: {what} is not a regular file (a folder, device or "
                    f"FIFO){not_regular_hint}")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror})") from None
    if size > limit:
        raise error(f"{path}: {what} of {size} bytes is larger than the "
                    f"{byte_size(limit)} a {kind or what} may have")
    try:
        return path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror})") from None


def utf8_text(data: bytes, path: str | os.PathLike, what: str,
              error: type[UserError] = UserError) -> str:
    """``data`` decoded as UTF-8, or one line (``error``) naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text (byte {e.start}: {e.reason})") from None


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
#
# The lock is ``fcntl.flock`` on an open descriptor of ``<folder>/.lock``: the kernel
# grants it to one open file description at a time and drops it when the last
# descriptor of that description is closed (the holder exits, is killed, loses power),
# so there is no stale lock to guess about. The file holds "pid step" of the holder, for
# the refusal message only. The holder unlinks the file while it still holds the lock;
# a process that locked a file which is no longer the one at ``.lock`` (it opened it
# just before the unlink) lets it go and tries again, so two processes never hold
# locks on two different files of the same name.
#
# A step started by ``run_all`` (lib/pipeline.py) runs while its parent holds the lock,
# and a re-open by the child would be a second open file description, refused. So the
# parent hands the child its very descriptor (``subprocess`` ``pass_fds``) and names it
# in the environment variable :data:`LOCK_ENV` (JSON: lock file path -> descriptor
# number, see :func:`inheritable_locks`). The child checks that the descriptor refers to
# the same file as ``.lock`` and locks it again: same open file description, so granted.
# The lock then lives as long as either process: an orphaned step still holds it.

LOCK_ENV = "BLCF_HELD_LOCKS"

_HELD: dict[str, int] = {}  # lock file path -> descriptor, for the locks this process took


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, step: str) -> Iterator[None]:
    """Hold ``<folder>/.lock`` (holder's pid and step) for the duration of the block.

    A second run pointed at the same folder refuses with LockedError naming the
    holder. A lock left by a dead process (SIGKILL, power cut) is free: the kernel
    released it. Inside a step started by ``run_all`` the parent's lock is taken over
    (see the comment above)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    key = str(lock.resolve())
    if key in _HELD or _inherited(key):
        yield  # this process (or the run_all that started it) already holds it
        return
    fd = _acquire(folder, lock, f"{os.getpid()} {step}\n")
    _HELD[key] = fd
    try:
        yield
    finally:
        del _HELD[key]
        try:
            if _same_file(fd, lock):
                lock.unlink()  # while still holding the lock: see the comment above
        finally:
            os.close(fd)


def _acquire(folder: Path, lock: Path, me: str) -> int:
    for _ in range(100):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid, step = _holder(lock)
            raise LockedError(
                f"{folder}: in use by another run (pid {pid}, step {step}); "
                "wait for it to finish"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if not _same_file(fd, lock):  # unlinked by its releasing holder: try again
            os.close(fd)
            continue
        data = me.encode()
        os.pwrite(fd, data, 0)  # first line complete before the old tail is cut
        os.ftruncate(fd, len(data))
        return fd
    raise LockedError(f"{folder}: could not take the lock {lock}")  # pragma: no cover


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fs = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fs.st_dev, fs.st_ino)


def _holder(lock: Path) -> tuple[str, str]:
    """The holder named in the lock file; it writes its line just after locking, so an
    empty file is read again for a moment."""
    for _ in range(50):
        got = _read_lock(lock)
        if got is not None:
            return str(got[0]), got[1]
        time.sleep(0.01)
    return "unknown", "unknown"


def _inherited(key: str) -> bool:
    """True when the environment hands this process a descriptor of the locked ``key``
    (a step started by run_all) and locking it again succeeds."""
    try:
        fd = int(json.loads(os.environ.get(LOCK_ENV) or "{}").get(key))
    except (TypeError, ValueError, AttributeError):
        return False
    try:
        if not _same_file(fd, Path(key)):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def inheritable_locks() -> tuple[str, tuple[int, ...]]:
    """(value for :data:`LOCK_ENV`, descriptors for ``pass_fds``) handing the locks this
    process holds to a child process, which then takes them over in :func:`output_lock`."""
    return json.dumps(_HELD, sort_keys=True), tuple(sorted(_HELD.values()))


def _read_lock(lock: Path) -> tuple[int, str] | None:
    try:
        first = lock.read_text().splitlines()[0]
        pid, _, step = first.strip().partition(" ")
        return int(pid), step
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
