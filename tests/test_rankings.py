"""Ranking folders: round trip, tie order, atomic replacement, and the reading errors
(unknown id, missing list, duplicate) naming file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lib.errors import UserError
from lib.search.rankings import rank_scores, read_ranking_folder, read_scores, write_ranking_folder

DB = [f"img{i:02d}" for i in range(8)]


def _write(out: Path, queries=("q1", "sub/q2"), seed: int = 0, **kw) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = rng.random((len(queries), len(DB))).astype(np.float32)
    write_ranking_folder(out, list(queries), DB, scores, rank_scores(scores),
                         {"settings": {"masking": 1}}, **kw)
    return scores


def test_rank_scores_breaks_ties_by_database_order() -> None:
    s = np.array([[0.5, 0.0, 0.5, 0.9, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(rank_scores(s), [[3, 0, 2, 1, 4]])


def test_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "bow"
    locs = {"q1": [{"image": "img03", "rank": 0, "score": 0.5, "box": [1, 2, 3, 4]}]}
    scores = _write(out, localisations=locs)
    assert (out / "lists" / "sub" / "q2.txt").is_file()
    assert (out / "queries.txt").read_text() == "q1\nsub/q2\n"
    rk = read_ranking_folder(out, DB)
    assert rk.queries == ["q1", "sub/q2"]
    for i, q in enumerate(rk.queries):
        expect = [DB[k] for k in np.argsort(-scores[i], kind="stable")]
        assert rk.lists[q] == expect
        np.testing.assert_array_equal(rk.indices[q], np.argsort(-scores[i], kind="stable"))
    assert rk.meta["settings"] == {"masking": 1} and rk.localisations == locs
    np.testing.assert_array_equal(read_scores(out), scores)


def test_rewrite_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bow"
    _write(out, seed=0)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        _write(out, seed=1)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bow"]  # no temp folder left


def test_bad_query_names_refused(tmp_path: Path) -> None:
    for bad in ("../x", "/abs", "a//b", ""):
        with pytest.raises(ValueError):
            _write(tmp_path / "r", queries=(bad,))
    assert not (tmp_path / "r").exists()


def test_truncated_list_is_accepted(tmp_path: Path) -> None:
    out = tmp_path / "bow"
    _write(out)
    (out / "lists" / "q1.txt").write_text("img03\nimg01\n")
    rk = read_ranking_folder(out, DB)
    assert rk.lists["q1"] == ["img03", "img01"]


@pytest.mark.parametrize("content, match", [
    ("img01\nimg99\nimg02\n", r"q1.txt, line 2 \(query 'q1'\): unknown image id 'img99'"),
    ("img01\nimg02\nimg03\nimg02\n", r"q1.txt, line 4 \(query 'q1'\): image id 'img02' "
     "listed twice"),
])
def test_reading_errors_name_file_and_line(tmp_path: Path, content: str, match: str) -> None:
    out = tmp_path / "bow"
    _write(out)
    (out / "lists" / "q1.txt").write_text(content)
    with pytest.raises(UserError, match=match):
        read_ranking_folder(out, DB)


def test_missing_list_and_folder(tmp_path: Path) -> None:
    out = tmp_path / "bow"
    _write(out)
    (out / "lists" / "sub" / "q2.txt").unlink()
    with pytest.raises(UserError, match=r"q2.txt: ranked list of query 'sub/q2' is missing"):
        read_ranking_folder(out, DB)
    with pytest.raises(UserError, match="not a ranking folder"):
        read_ranking_folder(tmp_path / "nothing", DB)


def test_reads_without_ranking_json(tmp_path: Path) -> None:
    out = tmp_path / "bow"
    _write(out)
    (out / "ranking.json").unlink()
    assert read_ranking_folder(out, DB).meta == {}
    (out / "ranking.json").write_text("{broken")
    with pytest.raises(UserError, match="ranking.json: not valid JSON"):
        read_ranking_folder(out, DB)
