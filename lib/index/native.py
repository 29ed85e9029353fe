"""The compiled ASMK scoring loop (``asmk_native.c``), built on first use.

Why compiled: the kernel reads every posting of every query word, several times as many
as BoW touches with query multiple assignment, and numpy needs about ten passes over
temporary arrays per posting where one C loop needs one. The C file is built with the
system's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) into a per-user cache
(``$BLCF_CACHE``, else ``$XDG_CACHE_HOME/blcf``, else ``~/.cache/blcf``), under a name
that hashes the source, the flags and the platform, so a changed source or another
machine type builds its own copy. The build goes to a temporary file renamed into place,
so processes building at once (cluster workers) never load a half-written library.

Without a compiler, or with ``BLCF_NATIVE=0`` (or ``false``, ``no``, ``off``),
:func:`asmk_library` returns None and :mod:`lib.index.asmk` scores with numpy: the same
sums, bit for bit (a test holds the two paths to that), only slower. Which one scores is
logged once per process. The cache must not be writable by others: whatever library
sits there under the expected name is loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("asmk_native.c")
# -ffp-contract=off: no fused multiply-add, so the sums equal numpy's bit for bit
FLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared")
_X86_FLAGS = ("-mpopcnt",)  # every x86-64 CPU since 2008 has the instruction

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def _flags() -> tuple[str, ...]:
    machine = platform.machine().lower()
    return FLAGS + (_X86_FLAGS if machine in ("x86_64", "amd64") else ())


def cache_dir() -> Path:
    if os.environ.get("BLCF_CACHE"):
        return Path(os.environ["BLCF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "blcf"


def _compiler() -> list[str] | None:
    """The compiler command: ``$CC`` (which may carry arguments, e.g. ``ccache gcc``),
    else the first of cc, gcc, clang on the PATH; None when there is none."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        argv = shlex.split(cc)
        path = shutil.which(argv[0])
        return [path, *argv[1:]] if path else None
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def library_path() -> Path:
    """Where the built library lives: its name hashes the source, the compiler command,
    the flags and the platform."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(_flags()).encode())
    h.update(" ".join(_compiler() or []).encode())
    h.update(f"{sys.platform} {platform.machine()}".encode())
    suffix = ".dll" if sys.platform == "win32" else ".so"
    return cache_dir() / f"asmk_native-{h.hexdigest()[:16]}{suffix}"


def _umask() -> int:
    """This process's umask without changing it (os.umask would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _build(target: Path, defines: Sequence[str] = ()) -> None:
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC)" if not os.environ.get("CC")
                      else f"CC={os.environ['CC']!r} is not on the PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *_flags(), *(f"-D{d}" for d in defines), "-o", tmp,
                               str(SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError(f"{' '.join(cc)} failed: {proc.stderr.strip()[-500:]}")
        os.chmod(tmp, 0o755 & ~_umask())  # mkstemp's 0600 would hide it from other users
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(target: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(target))
    p = ctypes.c_void_p
    lib.asmk_accumulate.argtypes = [ctypes.c_int64, ctypes.c_int64, p, p, p, p,
                                    ctypes.c_int64, p, p, ctypes.c_int, p, p, p]
    lib.asmk_accumulate.restype = ctypes.c_int64
    return lib


def _load() -> ctypes.CDLL:
    target = library_path()
    lib = None
    if target.exists():
        try:
            lib = _open(target)
        except (OSError, AttributeError) as e:  # damaged or foreign: build it anew
            log.warning("%s cannot be loaded (%s); building it again", target, e)
            target.unlink(missing_ok=True)
    if lib is None:
        _build(target)
        log.info("built the ASMK scoring loop: %s", target)
        lib = _open(target)
    log.info("ASMK scoring with the compiled loop (%s)", target)
    return lib


def build_variant(target: Path, defines: Sequence[str]) -> ctypes.CDLL:
    """The loop built with ``-D`` definitions (``["PREFETCH_BYTES=0"]``) into ``target``
    and loaded: for benchmarks that time variants of the loop against the one in use
    (pass it as ``score_postings(..., native=lib)``). ``target`` must be a path this
    process has not loaded before: the dynamic loader hands back a library already
    loaded from the same path, whatever was rebuilt there. Raises OSError without a
    compiler."""
    if isinstance(defines, str):
        raise TypeError("defines: a list of NAME=VALUE strings, not one string")
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target}: build each variant into a new path")
    _build(target, defines)
    return _open(target)


def disabled() -> bool:
    """``BLCF_NATIVE`` set to 0, false, no or off."""
    return os.environ.get("BLCF_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def asmk_library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None when disabled (:func:`disabled`) or
    when it cannot be built or loaded. Which one scores is logged once per process."""
    if disabled():
        if "disabled" not in _state:
            _state["disabled"] = None
            log.info("ASMK scoring with numpy (BLCF_NATIVE=%s)", os.environ["BLCF_NATIVE"])
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _load()
            except (OSError, AttributeError, subprocess.SubprocessError) as e:
                log.info("ASMK scoring with numpy (the compiled loop is unavailable: %s)", e)
                _state["lib"] = None
        return _state["lib"]
