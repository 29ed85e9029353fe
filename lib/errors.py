"""Errors a user can cause and fix.

Every such error is raised as :class:`UserError` with one line that names the culprit
(the settings key and file, the image, the artefact field ...). The command-line wrapper
in :mod:`lib.cli` prints that line and exits with ``exit_code``; nothing else is printed,
no stack trace.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input: settings, data, or artefacts from another run."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class SettingsError(UserError):
    """A settings key is unknown, of the wrong type, or names a missing path."""


class ArtefactMismatchError(UserError):
    """An input artefact was made with other settings than the ones asked for now."""


class LockedError(UserError):
    """Another run holds the lock on the output folder."""

    exit_code = 3


# ------------------------------------------------------------------ the machine's storage

# errno values that say something about the folder or the disk, not about our code: a
# full disk or quota, a read-only file system, missing permissions
_STORAGE_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM"}
LOW_SPACE = 64 << 20  # below this a failed write is taken for a full disk


def _free_bytes(path: str) -> int | None:
    import shutil
    from pathlib import Path

    p = Path(path)
    for folder in (p, *p.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def byte_size(n: int) -> str:
    """``n`` bytes for a message: whole binary units when exact (a limit: ``16 MiB``),
    else one decimal (free space: ``3.7 GiB``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n // scale} {unit}" if n % scale == 0 else f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def storage_error(e: OSError) -> UserError | None:
    """The one-line error for an ``OSError`` caused by the machine's storage (full disk,
    read-only file system, permissions), naming the path; None for any other OSError,
    which stays a bug to report with its trace. Writes are atomic and LMDB commits whole
    batches, so what was finished before the error is kept and a rerun resumes."""
    import errno

    name = errno.errorcode.get(e.errno or 0, "")
    if name not in _STORAGE_ERRNOS:
        return None
    path = e.filename or "?"
    if name in ("ENOSPC", "EDQUOT"):
        free = _free_bytes(str(path))
        left = f" ({byte_size(free)} free)" if free is not None else ""
        return UserError(f"{path}: no space left on the disk{left}; free some space and rerun "
                         "the same command (finished work is kept and the step resumes)")
    if name == "EROFS":
        return UserError(f"{path}: the file system is read-only; point path_output (or "
                         "path_features / path_models) at a writable folder")
    return UserError(f"{path}: permission denied ({e.strerror}); make the folder writable "
                     "or point path_output at another one")


def store_write_error(path: str, what: str, e: Exception) -> UserError:
    """The one-line error for an LMDB write that failed (LMDB reports a full disk as an
    I/O error at commit): says "disk full" when little space is left where the store
    lives, else names the error."""
    free = _free_bytes(path)
    if free is not None and free < LOW_SPACE:
        return UserError(f"{path}: cannot write the {what}: the disk is full ({byte_size(free)} "
                         "free); free some space and rerun the same command (finished work "
                         "is kept and the step resumes)")
    return UserError(f"{path}: cannot write the {what} ({e}); check the disk, then rerun "
                     "the same command to resume")
