"""The query cache (<path_output>/query_words.lmdb) answers only for the query files it
was made from: with the query photos gone (moved away, or ``path_queries`` pointing at an
empty folder) step D fails with the missing-image error instead of ranking from the
cache, and a query photo rewritten under the same name is read again."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.errors import UserError
from lib.index.assignment_store import AssignmentStore
from lib.search.augmentation import variants_for
from lib.search.step import rank_bow
from lib.settings import load_settings
from tests.helpers_pipeline import QUERY_SIZES, copy_dataset, make_dataset, run_pipeline

QUERIES = [name for name, _, _ in QUERY_SIZES]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A tiny dataset after steps A-D: the query cache holds every query."""
    root = tmp_path_factory.mktemp("qcache")
    run_pipeline(make_dataset(root), "ABCD")
    return root




def _cache_ids(run: Path) -> list[str]:
    with AssignmentStore(run / "query_words.lmdb") as st:
        return st.ids()


def _digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def test_cache_records_name_the_query_file(reference):
    s = load_settings(reference / "settings.json")
    views = [v.name for v in variants_for(int(s.augmentation))]
    want = [f"{q}#{v}#{_digest(reference / 'queries' / f'{q}.jpg')}"
            for q in QUERIES for v in views]
    assert sorted(_cache_ids(reference / "run")) == sorted(want)


def test_missing_query_photos_fail_instead_of_answering_from_the_cache(reference, tmp_path):
    sp = copy_dataset(reference / "settings.json", tmp_path / "r")
    run = tmp_path / "r" / "run"
    assert _cache_ids(run)  # every query is cached
    before = (run / "bow" / "scores.npy").read_bytes()
    # path_queries pointing at an empty folder
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = re.escape(f"image '{QUERIES[0]}' not found under {empty}")
    with pytest.raises(UserError, match=msg) as e:
        rank_bow(load_settings(sp, overrides=[f"path_queries={empty}"]))
    assert e.value.exit_code == 2
    # the query photos moved away from the configured folder
    queries = tmp_path / "r" / "queries"
    shutil.move(queries, tmp_path / "r" / "queries_away")
    queries.mkdir()
    with pytest.raises(UserError, match=re.escape(
            f"image '{QUERIES[0]}' not found under {queries}")):
        rank_bow(load_settings(sp))
    assert (run / "bow" / "scores.npy").read_bytes() == before  # nothing was rewritten


def test_rewritten_query_photo_is_read_again(reference, tmp_path):
    sp = copy_dataset(reference / "settings.json", tmp_path / "r")
    run = tmp_path / "r" / "run"
    s = load_settings(sp)
    before = np.load(run / "bow" / "scores.npy")
    photo = tmp_path / "r" / "queries" / f"{QUERIES[0]}.jpg"
    with Image.open(photo) as im:
        size = im.size
    # another photo under the same name: a database image, at the query's size
    with Image.open(tmp_path / "r" / "images" / "img_05.jpg") as im:
        im.convert("RGB").resize(size).save(photo, quality=90)
    res = rank_bow(s)
    n_views = len(variants_for(int(s.augmentation)))
    assert res.counts["query_cache"] == {"cached": len(QUERIES) - 1, "from_database": 0,
                                         "network": n_views}
    after = np.load(run / "bow" / "scores.npy")
    assert not np.array_equal(after[0], before[0])  # the new photo's scores
    np.testing.assert_array_equal(after[1:], before[1:])  # the others from the cache
    # what a run without any cache gives
    shutil.rmtree(run / "query_words.lmdb")
    res = rank_bow(s)
    assert res.counts["query_cache"] == {"cached": 0, "from_database": 0,
                                         "network": n_views * len(QUERIES)}
    np.testing.assert_array_equal(np.load(run / "bow" / "scores.npy"), after)
