"""Keep freed memory inside the process (glibc), so that query loops stop page-faulting.

Why: every query allocates a few arrays the size of the database (scores, ranks,
candidates: 0.4-0.8 MB each at 105k images, 4-8 MB at 1M). By default glibc gives such
blocks back to the kernel when they are freed (blocks above its mmap threshold are
unmapped; free space at the top of the heap is trimmed), so the next query writes to
fresh pages and pays one page fault per 4 KiB. Once scoring itself is fast, those page
faults can cost more than the scoring (benchmarks/bench_inverted_file.py
--default-malloc measures both ways; figures in benchmarks/README.md).

Raising the two thresholds keeps up to ``trim_mib`` of freed memory for reuse and serves
blocks up to ``mmap_mib`` from the heap. The cost is that much RSS the process may hold
without using it. The pipeline scripts call :func:`retain_freed_memory` once at start
(:func:`lib.cli.run_main`); call it yourself in your own query loop. Elsewhere than glibc
(musl, macOS, Windows) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# glibc <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def retain_freed_memory(trim_mib: int = 256, mmap_mib: int = 32) -> bool:
    """Set glibc's trim and mmap thresholds (MiB, each below 2048: mallopt takes a C
    int of bytes); True when glibc accepted both. (glibc before 2.26 or so refuses mmap
    thresholds above 32 MiB, hence that default.)"""
    for name, v in (("trim_mib", trim_mib), ("mmap_mib", mmap_mib)):
        if not 0 < int(v) < 2048:
            raise ValueError(f"{name}={v}: give 1 to 2047 MiB")
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        log.debug("no glibc mallopt: freed memory handling left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = (mallopt(M_MMAP_THRESHOLD, int(mmap_mib) << 20) == 1
          and mallopt(M_TRIM_THRESHOLD, int(trim_mib) << 20) == 1)
    log.debug("glibc keeps up to %d MiB of freed memory: %s", trim_mib, ok)
    return ok


__all__ = ["retain_freed_memory"]
