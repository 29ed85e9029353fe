"""What run_all's console shows: its lines per step, each step's summary and the final
mAP, and nothing else on a console that is not a terminal (no INFO logs of the steps, no
third-party loader chatter such as faiss's "Could not load library with AVX2 support")."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers_pipeline import env, make_dataset

REPO = Path(__file__).resolve().parent.parent
TITLES = {"A": "feature extraction", "B": "PCA-whitening + codebook",
          "C": "assignment maps + inverted file", "D": "BoW rankings", "E": "evaluation"}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env(), cwd=REPO)


def test_faiss_loader_chatter_is_silenced_unless_verbose():
    """faiss's loader logs at import time, at INFO, that the AVX2/AVX512 builds could not
    be loaded; setup_logging (called before any step imports faiss) hides it, -v shows it."""
    quiet = _python("from lib.cli import setup_logging; setup_logging(); import faiss")
    assert quiet.returncode == 0, quiet.stderr
    assert "faiss" not in quiet.stderr and "AVX" not in quiet.stderr, quiet.stderr
    loud = _python("from lib.cli import setup_logging; setup_logging(verbose=True); "
                   "import faiss")
    assert loud.returncode == 0, loud.stderr
    assert "faiss.loader" in loud.stderr  # what -v shows (this faiss logs its loading)


def _progress_bar(piece: str) -> bool:
    """A tqdm frame (a step's bar where the console is not a terminal)."""
    return bool(re.search(r"\d+%\|.*\| *\d+/\d+", piece))


def test_run_all_console_is_one_screen(tmp_path):
    """On a tiny set with n_centers "auto" (the generic settings' value): one line per
    step (its summary and wall time), then the mAP: 6 lines on stdout, and stderr holds
    nothing but progress bars (no logs, no faiss chatter)."""
    path = make_dataset(tmp_path / "d", n_centers="auto", kmeans_iter=50)
    proc = subprocess.run([sys.executable, str(REPO / "bow_pipeline" / "run_all.py"),
                           str(path)], capture_output=True, text=True, timeout=600, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert len(out) == 5 + 1, proc.stdout
    for i, key in enumerate(TITLES):
        assert re.fullmatch(rf"\[{i + 1}/5\] {key}: .* \(\d+\.\d s\)", out[i]), out[i]
    assert re.fullmatch(r"\[2/5\] B: \d+ features from 8 images -> PCA 672->8 \+ \d+ words "
                        r"\(auto\), \d+ k-means iterations \((converged|max_iter)\) in "
                        r"\d+\.\d s \(\d+\.\d s\)", out[1])
    assert out[-1].startswith("tiny: mAP ")
    pieces = [p.strip() for p in re.split(r"[\r\n]", proc.stderr) if p.strip()]
    assert all(_progress_bar(p) for p in pieces), proc.stderr[-3000:]
