"""Benchmark result files: a row with new columns must not shift the values of the
rows under an older header (benchmarks/bench_inverted_file.append_csv_row)."""

from __future__ import annotations

import csv
from pathlib import Path

from benchmarks.bench_inverted_file import append_csv_row


def test_new_columns_rewrite_the_file_with_every_value_under_its_name(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    append_csv_row(path, {"n": 1, "scores_ms": 5.0, "search_ms": 9.0})
    append_csv_row(path, {"n": 2, "scores_ms": 4.0, "scores_cpu_ms": 3.5, "search_ms": 8.0})
    append_csv_row(path, {"n": 3, "scores_ms": 2.0, "search_ms": 7.0})
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["n"] for r in rows] == ["1", "2", "3"]
    assert [r["search_ms"] for r in rows] == ["9.0", "8.0", "7.0"]
    assert [r["scores_cpu_ms"] for r in rows] == ["", "3.5", ""]
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left over
