"""Damaged or hostile inputs to the two LMDB stores (issue 19, items 1, 6 and 14).

* A truncated ``data.mdb`` used to kill every step with SIGBUS (exit 135 / -7, no
  message): the stores now compare the file with LMDB's own size record (the meta page)
  before mapping it and refuse with one line. Run in subprocesses: a SIGBUS would kill
  pytest itself.
* The assignment store reserved 1 TiB of address space, so C and D failed under
  ``ulimit -v``; it now reserves twice its file and grows on ``MapFullError``.
* An image id that cannot be an LMDB key (a non-UTF-8 file name, more than 511 bytes)
  used to fail step A after its batch was extracted, on every rerun; it is now listed
  with the corrupt images (reason named) and step A goes on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers_pipeline import REPO, call_step, env, make_dataset

SCRIPTS = REPO / "bow_pipeline"


def _truncate_half(store: Path) -> None:
    f = store / "data.mdb"
    size = f.stat().st_size
    os.truncate(f, size // 2)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _run_script(script: str, settings: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), str(settings)],
                          capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)


@pytest.fixture(scope="module")
def pipeline_abc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Settings of a tiny dataset after steps A, B and C (shared: only copies of its
    stores get damaged)."""
    root = tmp_path_factory.mktemp("damage")
    settings = make_dataset(root)
    for st in "ABC":
        call_step(st, settings)
    return settings


def _feature_store(settings: Path) -> Path:
    from lib.features.feature_store import FeatureStore
    from tests.helpers_pipeline import load

    store = FeatureStore.path_for(load(settings))
    assert (store / "data.mdb").is_file(), store
    return store


def test_truncated_feature_store_step_b_refuses(pipeline_abc, tmp_path):
    """Before the fix: B died of SIGBUS (returncode -7) without a word."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(pipeline_abc.parent, root)
    settings = root / pipeline_abc.name
    store = _feature_store(settings)
    shutil.rmtree(root / "run" / "models", ignore_errors=True)  # B must read the store
    _truncate_half(store)
    proc = _run_script("B_processing_clustering.py", settings)
    line = _one_error_line(proc, store.name, "damaged", "delete the folder")
    assert "step A" in line


def test_truncated_assignment_store_step_d_refuses(pipeline_abc, tmp_path):
    """Before the fix: D died of SIGBUS (returncode -7) without a word."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(pipeline_abc.parent, root)
    settings = root / pipeline_abc.name
    store = root / "run" / "assignments.lmdb"
    assert (store / "data.mdb").is_file()
    _truncate_half(store)
    proc = _run_script("D_rankings_BoW.py", settings)
    line = _one_error_line(proc, "assignments.lmdb", "damaged", "delete the folder")
    assert "step C" in line


_OPEN_TRUNCATED = r"""
import sys
from pathlib import Path
from lib.errors import UserError
from lib.features.feature_store import FeatureStore
from lib.index.assignment_store import AssignmentStore
cls = {"features": FeatureStore, "assignments": AssignmentStore}[sys.argv[1]]
try:
    st = cls(Path(sys.argv[2]), readonly=sys.argv[3] == "ro")
    print(len(st), st.meta, len([st.get(i) for i in st.ids()]))  # reads every page
except UserError as e:
    print("error:", e, file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("kind", ["features", "assignments"])
@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_truncated_store_open_refuses(tmp_path, kind, mode):
    """Both classes, both modes (step A and C open for writing), without a pipeline."""
    from lib.features.feature_store import FeatureStore
    from lib.index.assignment_store import AssignmentStore

    path = tmp_path / f"s_{kind}.lmdb"
    rng = np.random.default_rng(0)
    if kind == "features":
        st = FeatureStore.create(path, {"layers": ["x"], "feature_dtype": "float32"})
        st.put_many([(f"img_{i:03d}", {"x": rng.random((64, 8, 8), np.float32)}, (8, 8))
                     for i in range(60)])
    else:
        st = AssignmentStore.create(path, {"k": 1})
        st.put_many([(f"img_{i:03d}", rng.integers(0, 9, (64, 64)).astype(np.uint16),
                      (64, 64)) for i in range(60)])
    st.close()
    _truncate_half(path)
    proc = subprocess.run([sys.executable, "-c", _OPEN_TRUNCATED, kind, str(path), mode],
                          capture_output=True, text=True, timeout=120, env=env(), cwd=REPO)
    _one_error_line(proc, path.name, "damaged", "delete the folder")


_ADDRESS_SPACE = r"""
import resource, sys
from pathlib import Path
import numpy as np
lim = 4 << 30
resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
from lib.index.assignment_store import AssignmentStore
path = Path(sys.argv[1])
st = AssignmentStore.create(path, {"k": 1})
rng = np.random.default_rng(0)
# more than the initial map (64 MiB): the map has to grow on MapFullError
for b in range(12):
    st.put_many([(f"img_{b:02d}_{i:03d}", rng.integers(0, 60000, (512, 512)).astype(np.uint16),
                  (512, 512)) for i in range(16)])
st.close()
ro = AssignmentStore(path)
print(len(ro), ro.get("img_11_015")[0].shape)
ro.close()
"""


def test_assignment_store_under_address_space_limit(tmp_path):
    """Before the fix: ``lmdb.open`` with a 1 TiB map failed under a 4 GiB RLIMIT_AS."""
    proc = subprocess.run([sys.executable, "-c", _ADDRESS_SPACE, str(tmp_path / "a.lmdb")],
                          capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["192", "(512,", "512)"]


def test_feature_store_grows_its_map(tmp_path):
    """The shared helper: a write larger than the reserved map grows it."""
    from lib.features.feature_store import FeatureStore, map_size_for, write_growing

    path = tmp_path / "f.lmdb"
    st = FeatureStore.create(path, {"layers": ["x"], "feature_dtype": "float32"})
    env_ = st.env
    before = env_.info()["map_size"]
    blob = b"\0" * (1 << 20)
    write_growing(env_, lambda txn: [txn.put(f"k{i}".encode(), blob)
                                     for i in range(before // (1 << 20) + 8)])
    assert env_.info()["map_size"] > before
    st.close()
    assert map_size_for(path, 1) >= 2 * (path / "data.mdb").stat().st_size


@pytest.mark.parametrize("case", ["long", "non_utf8"])
def test_bad_ids_listed_as_corrupt_and_step_a_goes_on(tmp_path, case):
    """An id that cannot be a key is listed in ``<store>.corrupted.txt`` with its reason;
    the other images are stored and the step completes, rerun included. Before the fix:
    step A failed on every run (``lmdb.BadValsizeError`` at the commit of the extracted
    batch for the long id, ``UnicodeEncodeError`` for the non-UTF-8 name)."""
    from lib.features.extraction import run_extraction
    from lib.features.feature_store import FeatureStore, read_corrupted
    from tests.helpers_pipeline import load

    settings = make_dataset(tmp_path)
    images = tmp_path / "images"
    if case == "long":  # a real file whose id (folders included) is 552 bytes long
        bad_id = "d" * 200 + "/" + "e" * 200 + "/" + "f" * 150
        (images / bad_id).parent.mkdir(parents=True)
        listed, reason = bad_id, "at most 511"
    else:
        bad_id = os.fsdecode(b"caf\xe9")
        listed, reason = "caf\\xe9", "file name is not valid UTF-8"
    try:
        (images / f"{bad_id}.jpg").write_bytes((images / "img_02.jpg").read_bytes())
    except (OSError, UnicodeEncodeError):  # a file system refusing such names (macOS)
        pytest.skip(f"cannot create the file for case {case}")
    ids = ["img_00", "img_01", bad_id]
    s = load(settings)
    store_path = tmp_path / "feats.lmdb"
    for _ in range(2):
        r = run_extraction(s, ids, store_path)
        assert not r["interrupted"] and r["corrupt"] == 1
        with FeatureStore(store_path) as st:
            assert sorted(st.ids()) == ["img_00", "img_01"]
            assert st.meta["complete"] is True
        bad = read_corrupted(store_path)
        assert list(bad) == [listed] and reason in bad[listed], bad


def test_bad_distractor_id_listed_as_corrupt_when_streaming(tmp_path):
    """The streaming path of step C (distractors assigned without a feature store) lists
    an id over the key limit in ``assignments.corrupted.txt`` and stores the others.
    Before the fix: ``lmdb.BadValsizeError`` when the assigned batch was written."""
    from lib.groundtruth.loader import DISTRACTOR_PREFIX
    from lib.index.assignment_store import AssignmentStore
    from lib.index.streaming import stream_assignments
    from lib.provenance import assignment_record, load_models
    from tests.helpers_pipeline import load, run_pipeline, textured

    settings = make_dataset(tmp_path)
    run_pipeline(settings, "AB")
    long_name = "d" * 200 + "/" + "e" * 200 + "/" + "f" * 150
    rng = np.random.default_rng(3)
    for name in ("d_00", long_name):
        p = tmp_path / "distractors" / f"{name}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        textured(rng, 64, 48).save(p, quality=90)
    s = load(settings, f"path_distractors={tmp_path / 'distractors'}",
             "stream_distractors=true")
    pre = DISTRACTOR_PREFIX if DISTRACTOR_PREFIX.endswith("/") else DISTRACTOR_PREFIX + "/"
    ids = [pre + "d_00", pre + long_name]
    pca, cb = load_models(s)
    path = tmp_path / "assignments.lmdb"
    with AssignmentStore.create(path, assignment_record(s, pca, cb)) as st:
        r = stream_assignments(s, ids, pca, cb, st)
        assert r["corrupt_ids"] == [pre + long_name] and r["streamed"] == 1
        assert st.ids() == [pre + "d_00"]
    listed = (tmp_path / "assignments.corrupted.txt").read_text(encoding="utf-8")
    assert listed.startswith(pre + long_name + "\t") and "at most 511" in listed
