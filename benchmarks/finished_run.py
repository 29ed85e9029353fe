"""What the benchmarks that measure a variant on a finished run share: their command line
(settings file, run folder, ``--set`` overrides, ``--json``), the run's settings as the
steps after B read them, and the paired comparison of two per-query AP vectors."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from lib.settings import load_settings, parse_override
from lib.vocabulary.sizing import resolve_from_codebook


def arguments(doc: str | None, run_help: str) -> argparse.ArgumentParser:
    """SETTINGS, ``--run`` (the finished run folder), ``--set KEY=VALUE`` and ``--json``."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", type=Path)
    ap.add_argument("--run", type=Path, required=True, help=run_help)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="settings override (as for the steps), e.g. the dataset's paths")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
    return ap


def run_settings(a: argparse.Namespace) -> Any:
    """The settings file with the overrides, ``path_output`` = the run folder, and
    ``n_centers = "auto"`` resolved from the run's codebook."""
    over = dict(parse_override(x, a.settings) for x in a.set)
    return resolve_from_codebook(load_settings(a.settings, {**over, "path_output": str(a.run)}))


def aps(result: dict[str, Any], names: list[str]) -> np.ndarray:
    """Per-query AP of step E's :func:`lib.evaluation.metrics.evaluate` result, in the
    order of ``names``."""
    return np.array([result["per_query"][n] for n in names], float)


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> str:
    """``a - b`` per query, in points: the mean, a bootstrap 95 % interval over queries
    (2,000 resamples) and how many queries went up / down."""
    d = np.asarray(a, float) - np.asarray(b, float)
    rng = np.random.default_rng(seed)
    bs = [d[rng.integers(0, d.size, d.size)].mean() for _ in range(2000)]
    return (f"{100 * d.mean():+.2f} [{100 * np.percentile(bs, 2.5):+.2f}, "
            f"{100 * np.percentile(bs, 97.5):+.2f}], {int((d > 0).sum())}/{int((d < 0).sum())}")
