"""Session-wide test settings."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The compiled ASMK loop (lib/index/native.py) is built into a cache of its own for the
# test session, not into the user's ~/.cache/blcf.
if "BLCF_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="blcf-test-cache-")
    os.environ["BLCF_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)
