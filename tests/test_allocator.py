"""lib.allocator: freed query-sized blocks are reused instead of re-faulted."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import numpy as np
from lib.allocator import retain_freed_memory

def faults():  # a query's pattern: a few database-sized arrays, written, then freed
    a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        xs = [np.ones(n, np.float32) for n in (1 << 20, 3_000_000, 100_000, 1 << 20)]
        del xs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a

faults()
before = faults()
ok = retain_freed_memory()
faults()
print(ok, before, faults())
"""


def test_retained_memory_stops_page_faults_in_a_query_loop() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    out = subprocess.run([sys.executable, "-c", SCRIPT],
                         capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("not glibc: retain_freed_memory is a no-op there")
    before, after = int(out[1]), int(out[2])
    # 10 rounds of ~32 MB written: ~8k faults a round when glibc gives the memory back
    assert after < 100 and after * 10 <= before, (before, after)


def test_thresholds_beyond_a_c_int_are_refused() -> None:
    from lib.allocator import retain_freed_memory

    with pytest.raises(ValueError, match="trim_mib=4096"):
        retain_freed_memory(trim_mib=4096)  # 4096 << 20 would wrap to 0: trim everything
    with pytest.raises(ValueError, match="mmap_mib=0"):
        retain_freed_memory(mmap_mib=0)
