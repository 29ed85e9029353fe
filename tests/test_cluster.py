"""Steps A and C on a Dask cluster (``cluster`` = local:N or a scheduler address).

Why these tests: the cluster path is only worth having if it changes nothing but the
wall time. A run with ``cluster = local:2`` and small shards must give the single
process's bytes (feature store, assignment store, inverted file, rankings, map.txt),
also when a worker process is SIGKILLed in the middle of a shard; a shard finished by an
interrupted run must not be computed again; and settings must refuse a bad value.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers_pipeline import (
    call_step,
    dump_lmdb,
    files_of,
    make_dataset,
    run_pipeline,
    textured,
)

distributed = pytest.importorskip("distributed")

# 14 database images of three shapes (portrait, landscape, square), one unreadable
DB = [(f"img_{i:02d}", *[(64, 48), (48, 64), (56, 56), (80, 60)][i % 4]) for i in range(14)]
BROKEN = "img_99"
DISTRACTORS = [(f"d_{i:02d}", *[(64, 48), (48, 64), (72, 72)][i % 3]) for i in range(7)]
VOLATILE = ("settings_hash", "versions", "created", "count")


def _dataset(root: Path) -> Path:
    s = make_dataset(root, db_sizes=DB, path_distractors="distractors", new_dim=[6, 4])
    (root / "images" / f"{BROKEN}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    gt = json.loads((root / "gt.json").read_text())
    gt["imlist"].append(BROKEN)
    (root / "gt.json").write_text(json.dumps(gt))
    rng = np.random.default_rng(3)
    for name, w, h in DISTRACTORS:
        p = root / "distractors" / f"{name}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        textured(rng, w, h).save(p, quality=90)
    return s


def _outputs(run: Path) -> dict[str, Any]:
    """:func:`_stores`, every index and ranking file."""
    out = _stores(run)
    for folder in ("index", "bow/lists"):
        for k, v in files_of(run / folder).items():
            if k != "meta.json":
                out[f"{folder}/{k}"] = v
    out["map.txt"] = (run / "bow" / "map.txt").read_bytes()
    for p in run.rglob("*.corrupted.txt"):
        out[p.relative_to(run).as_posix()] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("cluster")
    s = _dataset(root)
    run_pipeline(s, "ABCDE")
    return s, _outputs(root / "run")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """One LocalCluster of two worker processes for the module (nannies restart a
    killed worker), reached by its address as an existing scheduler would be."""
    import dask

    with dask.config.set({"distributed.worker.daemon": False}):
        lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=":0")
    client = distributed.Client(lc)
    yield client
    client.close()
    lc.close()


def _kill_once(flag: str) -> None:
    """Runs in each worker: SIGKILL this worker process at its next shard record, once
    per flag (the flag is written first, so the retried shard runs through)."""
    import lib.cluster.shards as sh

    add = sh._ValueWriter.add

    def add_or_die(self: Any, image_id: str, value: bytes) -> None:
        if not os.path.exists(flag):
            with open(flag, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        add(self, image_id, value)

    sh._ValueWriter.add = add_or_die


def test_cluster_values_are_checked(tmp_path: Path) -> None:
    from lib.cluster.engine import parse_cluster
    from lib.errors import SettingsError
    from tests.helpers_pipeline import load

    assert parse_cluster("none").kind == "none"
    assert parse_cluster("local:3").workers == 3
    assert parse_cluster("tcp://10.1.2.3:8786").address == "tcp://10.1.2.3:8786"
    s = make_dataset(tmp_path)
    for bad in ("local:0", "local", "dask", "8786"):
        with pytest.raises(SettingsError, match="key 'cluster'"):
            load(s, f"cluster={bad}")
    with pytest.raises(SettingsError, match="key 'shard_size'"):
        load(s, "shard_size=0")


def test_local_cluster_gives_the_same_bytes(single: tuple[Path, dict[str, Any]],
                                            tmp_path: Path) -> None:
    """cluster = local:2, shards of 3 images: A, C (with streamed distractors too) and
    the index as tasks; every store, index file, ranking and map.txt as without."""
    s, expected = single
    over = [f"path_output={tmp_path / 'run'}", "cluster=local:2", "shard_size=3"]
    for step in "ABCDE":
        call_step(step, s, *over)
    got = _outputs(tmp_path / "run")
    assert set(got) == set(expected)
    for k in expected:
        assert got[k] == expected[k], k
    assert not list((tmp_path / "run").rglob(".*.shards"))  # job folders removed


def test_worker_killed_mid_shard(single: tuple[Path, dict[str, Any]], cluster: Any,
                                 tmp_path: Path) -> None:
    """A worker SIGKILLed inside a shard of step A, then another inside step C: the
    scheduler gives the shard to a live worker and the run ends with the same bytes."""
    s, expected = single
    over = [f"path_output={tmp_path / 'run'}", f"cluster={cluster.scheduler.address}",
            "shard_size=4"]
    for step, flag in (("A", tmp_path / "killed_a"), ("B", None), ("C", tmp_path / "killed_c"),
                       ("D", None), ("E", None)):
        if flag is not None:
            cluster.run(_kill_once, str(flag))
        call_step(step, s, *over)
        if flag is not None:
            assert flag.exists(), "no worker was killed"
    got = _outputs(tmp_path / "run")
    for k in expected:
        assert got[k] == expected[k], k


def test_streamed_distractors_on_the_cluster(single: tuple[Path, dict[str, Any]],
                                             cluster: Any, tmp_path: Path) -> None:
    """stream_distractors with the single run's models: the streamed word maps and the
    index are the single process's."""
    s, expected = single
    models = s.parent / "run" / "models"
    over = [f"path_output={tmp_path / 'run'}", f"path_models={models}",
            "stream_distractors=true", "TRAIN_PCA=false", "TRAIN_CENTROIDS=false"]
    call_step("A", s, *over)
    call_step("C", s, *over, f"cluster={cluster.scheduler.address}", "shard_size=2")
    recs, _ = dump_lmdb(tmp_path / "run" / "assignments.lmdb")
    assert recs == expected["assignments.lmdb"][0]
    idx = files_of(tmp_path / "run" / "index")
    for k, v in idx.items():
        if k != "meta.json":
            assert v == expected[f"index/{k}"], k


def test_finished_shards_are_not_redone(single: tuple[Path, dict[str, Any]], cluster: Any,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """The driver dies after merging two shards (the others finished or not): the rerun
    merges the finished shards from their files and computes only the rest."""
    import lib.cluster.shards as sh
    from lib.features.extraction import run_extraction
    from lib.groundtruth.loader import load_ground_truth
    from tests.helpers_pipeline import load

    s, expected = single
    st = load(s, f"path_output={tmp_path / 'run'}", f"cluster={cluster.scheduler.address}",
              "shard_size=2")
    ids = load_ground_truth(st).db_ids
    merge = sh._Merger._merge
    calls = {"n": 0}

    def dying(self: Any, i: int) -> None:
        calls["n"] += 1
        if calls["n"] > 2 and i not in self.empty:
            raise KeyboardInterrupt
        merge(self, i)

    monkeypatch.setattr(sh._Merger, "_merge", dying)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(st, ids)
    monkeypatch.setattr(sh._Merger, "_merge", merge)
    r = run_extraction(st, ids)
    timing = r["cluster"]
    assert timing["reused"] >= 1
    assert timing["tasks"] + timing["reused"] == -(-len(ids) // 2) - 2
    store = next((tmp_path / "run" / "features").glob("*.lmdb"))
    recs, _ = dump_lmdb(store)
    assert recs == expected[f"features/{store.name}"][0]


def test_a_failed_merge_names_the_store(tmp_path: Path) -> None:
    """A shard that cannot be written into the driver's store (here: opened read-only)
    gives the one-line storage error naming which store, not "the store"."""
    import lmdb

    import lib.cluster.shards as sh
    from lib.errors import UserError

    lmdb.open(str(tmp_path / "asg"), map_size=1 << 20).close()
    env = lmdb.open(str(tmp_path / "asg"), readonly=True, lock=False)
    job = tmp_path / "job"
    job.mkdir()
    (job / "shard-00000.json").write_text(json.dumps(
        {"ids": ["a"], "lengths": [3], "covers": ["a"]}), encoding="utf-8")
    (job / "shard-00000.bin").write_bytes(b"xyz")
    merger = sh._Merger(env, job, ["shard-00000"], empty=set(), what="assignment store")
    with pytest.raises(UserError, match="cannot write the assignment store"):
        merger.add(0, {})
    env.close()


def test_keep_cells_on_the_cluster(single: tuple[Path, dict[str, Any]], cluster: Any,
                                   tmp_path: Path) -> None:
    """keep_cells with streamed distractors: the cluster's shards write the single
    process's word maps (weaker cells marked "no word", database images and streamed
    distractors alike) and index, byte for byte."""
    from lib.index.assignment_store import AssignmentStore

    s, _ = single
    run = s.parent / "run"
    over = [f"path_models={run / 'models'}", f"path_features={run / 'features'}",
            "stream_distractors=true", "TRAIN_PCA=false", "TRAIN_CENTROIDS=false",
            "keep_cells=0.6"]
    call_step("C", s, f"path_output={tmp_path / 'one'}", *over)
    call_step("C", s, f"path_output={tmp_path / 'two'}", *over,
              f"cluster={cluster.scheduler.address}", "shard_size=2")
    one, _ = dump_lmdb(tmp_path / "one" / "assignments.lmdb")
    two, _ = dump_lmdb(tmp_path / "two" / "assignments.lmdb")
    assert one == two
    for k, v in files_of(tmp_path / "one" / "index").items():
        if k != "meta.json":
            assert v == (tmp_path / "two" / "index" / k).read_bytes(), k
    with AssignmentStore(tmp_path / "one" / "assignments.lmdb") as a:
        K = int(a.meta["n_centers"])
        names = a.ids()
        dropped = {i: int((a.get(i)[0] == K).sum()) for i in names}
    streamed = [n for n in names if n.rsplit("/", 1)[-1].startswith("d_")]
    assert len(streamed) == len(DISTRACTORS)
    assert all(d > 0 for d in dropped.values()), dropped


def test_scales_on_the_cluster(single: tuple[Path, dict[str, Any]], cluster: Any,
                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """scales [1, 0.5]: step A extracts both scales and step C assigns both on the
    cluster; every feature store, both assignment stores and the index (built in the
    driver from both) are the single process's, byte for byte."""
    import lib.cluster.shards as sh

    assigned, extracted = [], []
    for name, seen, key in (("assign_on_cluster", assigned, "scale"),
                            ("extract_on_cluster", extracted, None)):
        fn = getattr(sh, name)

        def spy(*a: Any, _fn: Any = fn, _seen: list = seen, _key: Any = key, **kw: Any):
            _seen.append(kw.get(_key, 1.0) if _key else a[1]["input_size"])
            return _fn(*a, **kw)

        monkeypatch.setattr(sh, name, spy)
    s, _ = single
    run = s.parent / "run"
    over = [f"path_models={run / 'models'}", "TRAIN_PCA=false", "TRAIN_CENTROIDS=false",
            "scales=[1, 0.5]"]
    for step in "AC":
        call_step(step, s, f"path_output={tmp_path / 'one'}", *over)
        call_step(step, s, f"path_output={tmp_path / 'two'}", *over,
                  f"cluster={cluster.scheduler.address}", "shard_size=2")
    assert assigned == [1.0, 0.5] and extracted == [[64, 48], [32, 32]]
    one, two = _stores(tmp_path / "one"), _stores(tmp_path / "two")
    assert len([k for k in one if k.startswith("features/")]) == 2
    assert "assignments_x0.5.lmdb" in one
    assert one == two
    for k, v in files_of(tmp_path / "one" / "index").items():
        if k != "meta.json":
            assert v == (tmp_path / "two" / "index" / k).read_bytes(), k


def test_streamed_scales_on_the_cluster(single: tuple[Path, dict[str, Any]], cluster: Any,
                                        tmp_path: Path) -> None:
    """scales [1, 0.5] with streamed distractors: the cluster streams the distractors at
    both scales (a job per scale) and writes the single process's stores and index."""
    s, _ = single
    run = s.parent / "run"
    over = [f"path_models={run / 'models'}", "TRAIN_PCA=false", "TRAIN_CENTROIDS=false",
            "scales=[1, 0.5]", "stream_distractors=true"]
    for step in "AC":
        call_step(step, s, f"path_output={tmp_path / 'one'}", *over)
        call_step(step, s, f"path_output={tmp_path / 'two'}", *over,
                  f"cluster={cluster.scheduler.address}", "shard_size=2")
    one, two = _stores(tmp_path / "one"), _stores(tmp_path / "two")
    half = one["assignments_x0.5.lmdb"][0]
    assert sum(k.startswith(b"distractors/") for k in half) == len(DISTRACTORS)
    assert one == two
    for k, v in files_of(tmp_path / "one" / "index").items():
        if k != "meta.json":
            assert v == (tmp_path / "two" / "index" / k).read_bytes(), k


def _stores(run: Path) -> dict[str, Any]:
    """Every LMDB store under ``run`` by content (metadata without per-run fields)."""
    out: dict[str, Any] = {}
    for p in sorted(run.rglob("data.mdb")):
        recs, meta = dump_lmdb(p.parent)
        out[p.parent.relative_to(run).as_posix()] = (
            recs, {k: v for k, v in meta.items() if k not in VOLATILE})
    return out


def test_worker_threads_keep_torch_count_when_faiss_differs() -> None:
    """A driver that imported faiss before torch can send faiss 2 and torch 1. In a worker
    whose torch and faiss share an OpenMP runtime, setting faiss after torch used to give
    the second task torch's count 2, so its maps differed from the store's (found when
    tests/test_settings.py ran before this module). Run as a worker runs tasks: a fresh
    process, torch imported first, repeated calls in a non-main thread."""
    code = (
        "import threading, torch, faiss\n"
        "from lib.cluster.shards import _set_threads\n"
        "out = []\n"
        "def work():\n"
        "    for _ in range(3):\n"
        "        _set_threads({'torch': 1, 'faiss': 2})\n"
        "        out.append(torch.get_num_threads())\n"
        "t = threading.Thread(target=work); t.start(); t.join()\n"
        "print(out)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[1, 1, 1]"
