"""Step A's maps depend on torch's intra-op thread count on the CPU (EfficientNet-Lite0:
one and two threads differ in the last bits), so a store never mixes maps computed
under two counts: A records the device and thread count in the store's metadata
(``compute``) and refuses to resume under others, with one line saying how to go on
(lib/features/extraction.py ``compute_record``, ``check_compute``)."""

from __future__ import annotations

import pytest
import torch
from helpers_pipeline import load, make_dataset

from lib.errors import UserError
from lib.features.extraction import run_extraction
from lib.features.feature_store import FeatureStore
from lib.groundtruth.loader import load_ground_truth


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_resume_under_another_thread_count_is_refused(tmp_path, threads):
    s = load(make_dataset(tmp_path / "d"))
    ids = load_ground_truth(s).db_ids
    store = tmp_path / "store.lmdb"
    threads(1)
    r = run_extraction(s, ids, store, stop_after_batches=1)
    assert r["interrupted"] and r["extracted"] == 2
    with FeatureStore(store) as st:
        assert st.meta["compute"] == {"device": "cpu", "threads": 1}
        before = {i: st.get(i)[0]["s6_expand"].tobytes() for i in st.ids()}

    threads(2)  # killed under one thread, resumed under two: refused, nothing added
    with pytest.raises(UserError) as e:
        run_extraction(s, ids, store)
    msg = str(e.value)
    assert "\n" not in msg and str(store) in msg
    assert "2 stored images" in msg and "1 intra-op thread(s)" in msg
    assert "resume with OMP_NUM_THREADS=1" in msg
    with FeatureStore(store) as st:
        assert len(st) == 2 and st.meta["compute"] == {"device": "cpu", "threads": 1}

    threads(1)  # under the recorded count it resumes and completes
    r = run_extraction(s, ids, store)
    assert r["extracted"] == len(ids) - 2 and not r["interrupted"]
    with FeatureStore(store) as st:
        assert st.meta["complete"] is True
        assert st.meta["compute"] == {"device": "cpu", "threads": 1}
        assert {i: st.get(i)[0]["s6_expand"].tobytes() for i in before} == before

    threads(2)  # a complete store: nothing to add, nothing mixed, no refusal
    r = run_extraction(s, ids, store)
    assert r["extracted"] == 0
    with FeatureStore(store) as st:
        assert st.meta["compute"] == {"device": "cpu", "threads": 1}


def test_a_new_store_records_this_runs_thread_count(tmp_path, threads):
    s = load(make_dataset(tmp_path / "d"))
    ids = load_ground_truth(s).db_ids
    threads(2)
    run_extraction(s, ids, tmp_path / "store.lmdb")
    with FeatureStore(tmp_path / "store.lmdb") as st:
        assert st.meta["compute"] == {"device": "cpu", "threads": 2}
