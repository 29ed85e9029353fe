"""Keep freed memory inside the process (glibc), so that query loops stop page-faulting.

Why: every query allocates a few arrays the size of the database (scores, ranks,
candidates: 0.4-0.8 MB each at 105k images, 4-8 MB at 1M). By default glibc gives such
blocks back to the kernel when they are freed (blocks above its mmap threshold are
unmapped; free space at the top of the heap is trimmed), so the next query writes to
fresh pages and pays one page fault per 4 KiB. At 105k images that more than tripled the
cost of a top-100 query (1.1 ms instead of 0.3) and added ~1 ms to a full ranking
(benchmarks/bench_inverted_file.py, which calls search after scores on the same query).

Raising the two thresholds keeps up to ``trim_mib`` of freed memory for reuse and serves
blocks up to ``mmap_mib`` from the heap. The cost is that much RSS the process may hold
without using it. The pipeline scripts call :func:`retain_freed_memory` once at start
(:func:`lib.cli.run_main`); call it yourself in your own query loop. Elsewhere than glibc
(musl, macOS, Windows) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# glibc <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit systems)
MAX_MMAP_MIB = 32


def retain_freed_memory(trim_mib: int = 256, mmap_mib: int = MAX_MMAP_MIB) -> bool:
    """Set glibc's trim and mmap thresholds (MiB); True when glibc accepted both."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt: freed memory handling left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = (mallopt(M_MMAP_THRESHOLD, min(int(mmap_mib), MAX_MMAP_MIB) << 20) == 1
          and mallopt(M_TRIM_THRESHOLD, int(trim_mib) << 20) == 1)
    log.debug("glibc keeps up to %d MiB of freed memory: %s", trim_mib, ok)
    return ok


__all__ = ["retain_freed_memory"]
