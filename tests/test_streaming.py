"""The streaming mode for distractors (lib/index/streaming.py, step C with stream_distractors).

Why these tests: the streaming pass must be a pure storage optimisation. With the same PCA
and codebook, its assignment maps and inverted file must be byte-identical to the normal
path (A stores every map, C assigns), an interrupted stream must resume to the same store,
and models from other features must be refused naming the field.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lib.errors import ArtefactMismatchError
from tests.helpers_pipeline import (
    assert_one_error,
    call_step,
    dump_lmdb,
    files_of,
    make_dataset,
    refusal,
    run_pipeline,
    textured,
)

# distractors: landscape, portrait, square, one more of each orientation, one unreadable
DISTRACTORS = [("d_00", 64, 48), ("d_01", 48, 64), ("d_02", 72, 72), ("d_03", 96, 72),
               ("d_04", 60, 80), ("sub/d_05", 80, 60)]
BROKEN = "d_99"
VOLATILE = ("settings_hash", "versions", "count", "created")


def _write_distractors(root: Path) -> None:
    rng = np.random.default_rng(7)
    for name, w, h in DISTRACTORS:
        p = root / "distractors" / f"{name}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        textured(rng, w, h).save(p, quality=90)
    (root / "distractors" / f"{BROKEN}.jpg").write_bytes(b"\xff\xd8 not a jpeg")


def _settings(path: Path, **over: Any):
    from lib.settings import load_settings

    return load_settings(path, overrides=[f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two runs on one tiny dataset: normal (A, B, C over everything) and streaming
    (A over the dataset's own images, C streams the distractors with the normal run's
    PCA and codebook)."""
    from lib.features.extraction import run_extraction
    from lib.groundtruth.loader import DISTRACTOR_PREFIX, load_ground_truth

    root = tmp_path_factory.mktemp("stream")
    _write_distractors(root)
    normal = make_dataset(root, path_distractors="distractors", path_output="run_n",
                          new_dim=[6, 4])
    run_pipeline(normal, "ABC")
    stream = root / "stream.json"
    stream.write_text(normal.read_text().replace('"run_n"', '"run_s"'))
    s = _settings(stream, path_models=str(root / "run_n" / "models"),
                  stream_distractors="true")
    ids = [i for i in load_ground_truth(s).db_ids if not i.startswith(DISTRACTOR_PREFIX)]
    run_extraction(s, ids)  # step A with the distractor filter the streaming mode implies
    out = call_step("C", stream, f"path_models={root / 'run_n/models'}",
                    "stream_distractors=true").summary
    assert "distractors streamed" in out
    return {"root": root, "normal": root / "run_n", "stream": root / "run_s",
            "settings": stream}


def _meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in VOLATILE}


def test_stream_identical_to_normal_path(runs: dict[str, Path]) -> None:
    n_recs, n_meta = dump_lmdb(runs["normal"] / "assignments.lmdb")
    s_recs, s_meta = dump_lmdb(runs["stream"] / "assignments.lmdb")
    distractors = {k for k in s_recs if k.startswith(b"distractors/")}
    assert len(distractors) == len(DISTRACTORS)  # every readable distractor, not the broken
    assert s_recs == n_recs
    assert _meta(s_meta) == _meta(n_meta)
    # no float maps of distractors were kept in the streaming run's feature store
    feats = next((runs["stream"] / "features").glob("*.lmdb"))
    f_recs, _ = dump_lmdb(feats)
    assert f_recs and not any(k.startswith(b"distractors/") for k in f_recs)
    # the inverted files are the same, file by file (metadata aside: settings hash)
    a, b = files_of(runs["normal"] / "index"), files_of(runs["stream"] / "index")
    assert set(a) == set(b) >= {"image_ids.txt", "offsets.npy", "docs.npy", "weights.npy"}
    for name in a:
        if name != "meta.json":
            assert a[name] == b[name], name
    ma, mb = (json.loads(m["meta.json"]) for m in (a, b))
    assert _meta(ma.get("meta", ma)) == _meta(mb.get("meta", mb))
    ids = (runs["stream"] / "index" / "image_ids.txt").read_text().split()
    assert f"distractors/{DISTRACTORS[-1][0]}" in ids and f"distractors/{BROKEN}" not in ids
    corrupt = (runs["stream"] / "assignments.corrupted.txt").read_text()
    assert corrupt.startswith(f"distractors/{BROKEN}\t")


def _store_for(s: Any, path: Path):
    from lib.index.assignment_store import AssignmentStore
    from lib.provenance import assignment_record, load_models

    pca, cb = load_models(s)
    return pca, cb, AssignmentStore.create(path, assignment_record(s, pca, cb))


def test_resume_after_interruption(runs: dict[str, Path], tmp_path: Path) -> None:
    from lib.groundtruth.loader import DISTRACTOR_PREFIX, load_ground_truth
    from lib.index.streaming import stream_assignments

    s = _settings(runs["settings"], path_models=str(runs["normal"] / "models"),
                  stream_distractors="true")
    ids = [i for i in load_ground_truth(s).db_ids if i.startswith(DISTRACTOR_PREFIX)]
    path = tmp_path / "assignments.lmdb"
    pca, cb, st = _store_for(s, path)
    try:
        r1 = stream_assignments(s, ids, pca, cb, st, stop_after_batches=1)
        assert r1["interrupted"] and 0 < r1["streamed"] < len(DISTRACTORS)
        assert len(st) == r1["streamed"]
        r2 = stream_assignments(s, ids, pca, cb, st)
        assert not r2["interrupted"]
        assert r2["skipped"] == r1["streamed"]
        assert r1["streamed"] + r2["streamed"] == len(DISTRACTORS)
        assert r2["corrupt_ids"] == [f"distractors/{BROKEN}"]
        r3 = stream_assignments(s, ids, pca, cb, st)  # nothing left: nothing recomputed
        assert r3["streamed"] == 0 and r3["skipped"] == len(DISTRACTORS)
    finally:
        st.close()
    resumed, _ = dump_lmdb(path)
    full, _ = dump_lmdb(runs["stream"] / "assignments.lmdb")
    assert resumed == {k: v for k, v in full.items() if k.startswith(b"distractors/")}


def test_models_from_another_network_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    from lib.groundtruth.loader import DISTRACTOR_PREFIX, load_ground_truth
    from lib.index.streaming import stream_assignments
    from lib.provenance import models_paths
    from lib.vocabulary.codebook import Codebook
    from lib.vocabulary.pca import PCAWhitening

    good = _settings(runs["settings"], path_models=str(runs["normal"] / "models"))
    p_pca, p_cb = models_paths(good)
    pca, cb = PCAWhitening.load(p_pca), Codebook.load(p_cb)
    other = _settings(runs["settings"], path_models=str(runs["normal"] / "models"),
                      layers='["head"]')
    ids = [i for i in load_ground_truth(good).db_ids if i.startswith(DISTRACTOR_PREFIX)]
    _, _, st = _store_for(good, tmp_path / "assignments.lmdb")
    try:
        with pytest.raises(ArtefactMismatchError, match="'layers'"):
            stream_assignments(other, ids, pca, cb, st)
        assert len(st) == 0
    finally:
        st.close()
    # and from step C: one error line naming the field, exit code 2
    out = runs["root"] / "run_x"
    shutil.rmtree(out, ignore_errors=True)
    err = refusal("C", runs["settings"], f"path_output={out}",
                  f"path_models={runs['normal'] / 'models'}", "stream_distractors=true",
                  'layers=["head"]')
    assert_one_error(err, "'layers'")


def test_store_from_other_models_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    from lib.groundtruth.loader import DISTRACTOR_PREFIX, load_ground_truth
    from lib.index.assignment_store import AssignmentStore
    from lib.index.streaming import stream_assignments
    from lib.provenance import assignment_record, load_models

    s = _settings(runs["settings"], path_models=str(runs["normal"] / "models"))
    pca, cb = load_models(s)
    meta = {**assignment_record(s, pca, cb), "codebook_hash": "0123456789abcdef"}
    ids = [i for i in load_ground_truth(s).db_ids if i.startswith(DISTRACTOR_PREFIX)]
    with (AssignmentStore.create(tmp_path / "assignments.lmdb", meta) as st,
          pytest.raises(ArtefactMismatchError, match="'codebook_hash'")):
        stream_assignments(s, ids, pca, cb, st)


def test_distractors_already_extracted_are_not_streamed(runs: dict[str, Path]) -> None:
    """A feature store that already holds the distractors (a run without streaming) is
    used as is: nothing is streamed and the result is the normal path's."""
    out = runs["root"] / "run_y"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    shutil.copytree(runs["normal"] / "features", out / "features")
    text = call_step("C", runs["settings"], f"path_output={out}",
                     f"path_models={runs['normal'] / 'models'}",
                     "stream_distractors=true").summary
    assert "C: 0 distractors streamed" in text
    assert dump_lmdb(out / "assignments.lmdb")[0] == \
        dump_lmdb(runs["normal"] / "assignments.lmdb")[0]
