"""``scales``: step A extracts every scale into a store of its own, step C assigns each
with scale 1's models into an assignment store of its own and indexes the combination of
the per-scale vectors, and step D (and the query service) encode queries the same way;
scale 1 stays the map of re-ranking and localisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers_pipeline import DB_SIZES, call_step, load, make_dataset, refusal, run_pipeline

from lib.errors import SettingsError, UserError
from lib.features.scales import assignment_path, at_scale, combine, tag
from lib.index.bow import to_dense
from lib.index.encoding import database_vector

SCALES = ("input_size=[128, 96]", "scales=[1, 0.5]")


def test_settings_of_a_scale(tmp_path: Path):
    s = make_dataset(tmp_path)
    st = load(s, "input_size=[512, 384]", "new_dim=[64, 48]", "scales=[1, 0.7071, 0.5]")
    assert st["scales"] == [1.0, 0.7071, 0.5]
    half = at_scale(st, 0.5)
    assert half["input_size"] == [256, 192] and half["new_dim"] == [32, 24]
    assert half["max_side"] == 1024 and half["scales"] == [1.0]  # resize = fixed
    assert at_scale(load(s, "resize=max_side", "max_side=800", "scales=[1, 0.5]"),
                    0.5)["max_side"] == 400
    assert at_scale(st, 0.7071)["input_size"] == [362, 272]
    assert at_scale(load(s, "new_dim=null"), 0.5)["new_dim"] is None
    assert tag(0.7071) == "x0.7071" and tag(0.5) == "x0.5"
    assert assignment_path(st, 0.5).name == "assignments_x0.5.lmdb"


@pytest.mark.parametrize("bad, needle", [
    ("scales=[0.5, 1]", "must start with 1"),
    ("scales=[1, 0.5, 0.5]", "each scale once"),
    ("scales=[1, 0.1]", "between 0.25 and 2"),
    ("scales=[1, true]", "list of float"),
    ("scales=[]", "must not be empty"),
    ("scales=[1, 0.70711, 0.70712]", "scales 0.70711 and 0.70712 give the same"),
    ("scales=[1, 0.3, 0.25]", "scales 0.3 and 0.25 give the same input size"),
])
def test_bad_scales(tmp_path: Path, bad: str, needle: str):
    s = make_dataset(tmp_path)
    with pytest.raises(SettingsError, match=needle):
        load(s, bad)


def test_scales_whose_sizes_leave_their_range_are_refused_up_front(tmp_path: Path):
    """Named by the key the user set (scales), not by the scaled key it would break."""
    s = make_dataset(tmp_path)
    with pytest.raises(SettingsError, match=r"'scales': scale 2 gives input_size \[2400, 1800\]"):
        load(s, "input_size=[1200, 900]", "scales=[1, 2]")
    with pytest.raises(SettingsError, match=r"'scales': scale 2 gives new_dim \[400, 300\]"):
        load(s, "input_size=[512, 384]", "new_dim=[200, 150]", "scales=[1, 2]")
    with pytest.raises(SettingsError, match=r"'scales': scale 2 gives max_side \[3000\]"):
        load(s, "resize=max_side", "max_side=1500", "scales=[1, 2]")
    load(s, "max_side=1500", "scales=[1, 2]")  # max_side unused with resize = fixed


@pytest.mark.parametrize("other", ["kernel=asmk", "resize=none"])
def test_several_scales_refuse_what_they_do_not_support(tmp_path: Path, other: str):
    s = make_dataset(tmp_path)
    with pytest.raises(SettingsError, match="several scales do not work with " +
                       other.split("=")[0]):
        load(s, "scales=[1, 0.5]", other)
    load(s, "scales=[1]", other)  # one scale: accepted


def test_combine_weighs_each_scale_by_its_square():
    a = (np.array([0, 2], np.int32), np.array([0.6, 0.8], np.float32))
    b = (np.array([2, 3], np.int32), np.array([1.0, 0.0], np.float32)[[0, 0]] / np.sqrt(2))
    got = to_dense(combine([a, b], [1.0, 0.5]), 4)
    want = np.array([0.6, 0.0, 0.8 + 0.25 / np.sqrt(2), 0.25 / np.sqrt(2)])
    np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-6)
    assert combine([a], [1.0]) is a
    with pytest.raises(ValueError):
        combine([a, b], [1.0])


def test_pipeline_with_two_scales(tmp_path: Path):
    """A -> E with scales [1, 0.5]: two feature stores (the second made at half the
    input size), two assignment stores with the same models, an index holding the
    combined vectors, step D's query vectors combined the same way and its first-stage
    scores their dot products; a second C assigns nothing."""
    from lib.features.feature_store import FeatureStore
    from lib.features.images import load_image
    from lib.groundtruth.loader import image_path, load_ground_truth
    from lib.index.assignment_store import AssignmentStore
    from lib.index.inverted_file import InvertedFile
    from lib.search.query_encoding import QueryEncoder

    s = make_dataset(tmp_path, input_size=[128, 96])
    run_pipeline(s, "AB")
    over = ("scales=[1, 0.5]", "rerank=false", "query_expansion=none")
    a = call_step("A", s, *over)
    assert a.counts["scales_extracted"] == [0, len(DB_SIZES)] and len(a.outputs) == 2
    st = load(s, *over)
    half = at_scale(st, 0.5)
    with FeatureStore(FeatureStore.path_for(half)) as fs:
        assert fs.meta["provenance"]["input_size"] == [64, 48]
    for step in "CDE":
        call_step(step, s, *over)
    out = Path(st["path_output"])
    index = InvertedFile.load(out / "index")
    K = int(index.n_words)
    assert index.meta["scales"] == [1.0, 0.5]
    with AssignmentStore(AssignmentStore.path_for(st)) as one, \
            AssignmentStore(assignment_path(st, 0.5)) as two:
        assert two.meta["provenance"]["input_size"] == [64, 48]
        assert two.meta["codebook_hash"] == one.meta["codebook_hash"]
        maps1 = {i: one.get(i)[0] for i in index.image_ids}
        maps2 = {i: two.get(i)[0] for i in index.image_ids}
    assert all(maps2[i].size * 3 < maps1[i].size for i in maps1)  # a quarter of the cells
    vecs = [combine([database_vector(maps1[i], st["weighting"], K),
                     database_vector(maps2[i], st["weighting"], K)], [1.0, 0.5])
            for i in index.image_ids]
    for v in vecs[:3]:
        want = [float(to_dense(v, K) @ to_dense(w, K)) for w in vecs]
        np.testing.assert_allclose(index.scores(v), want, atol=1e-4)  # stored as uint16
    # step D: each query's vector is the combination of its two scales' vectors
    scores = np.load(out / "bow" / "scores.npy")
    gt = load_ground_truth(st)
    one_scale = QueryEncoder(load(s, "rerank=false", "query_expansion=none"))
    try:
        first = [one_scale.encode(q).vector for q in gt.queries]
    finally:
        one_scale.close()
    enc = QueryEncoder(st)
    try:
        assert [e.s["input_size"] for e in enc.scale_encoders] == [[64, 48]]
        # one backbone in memory: the extra scale uses it under its own input size
        ext = enc.load_network()
        sub_ext = enc.scale_encoders[0]._extractor
        assert sub_ext is not None and sub_ext.backbone is ext.backbone
        assert sub_ext.input_size_for(128, 96) == (48, 64) != ext.input_size_for(128, 96)
        for qi, q in enumerate(gt.queries):
            v1 = first[qi]
            v2 = enc.scale_encoders[0].encode(q).vector
            assert not np.array_equal(to_dense(v1, K), to_dense(v2, K))
            qv = combine([v1, v2], [1.0, 0.5])
            np.testing.assert_allclose(to_dense(enc.encode(q).vector, K), to_dense(qv, K),
                                       rtol=1e-6)
            want = [float(to_dense(qv, K) @ to_dense(w, K)) for w in vecs]
            np.testing.assert_allclose(scores[qi], want, atol=1e-4)
            # a decoded photo (search.py, serve.py) gets the same vector
            img = load_image(image_path(st, q.image, query=True))
            np.testing.assert_allclose(to_dense(enc.encode_image(img, q.bbox, q.name).vector, K),
                                       to_dense(qv, K), rtol=1e-6)
        # an extra scale whose query holds no word (every cell dropped) adds nothing;
        # scale 1 without words is still an error naming the query
        sub = enc.scale_encoders[0]
        q = gt.queries[0]
        hw0 = sub.words(q.image)[1]
        sub.words = lambda image_id: ([np.full((2, 2), K, np.uint16)], hw0)
        np.testing.assert_allclose(to_dense(enc.encode(q).vector, K),
                                   to_dense(first[0], K), rtol=1e-6)
        enc.words = lambda image_id: ([np.full((2, 2), K, np.uint16)], hw0)
        with pytest.raises(UserError, match="no query words"):
            enc.encode(q)
    finally:
        enc.close()
    assert (out / "query_words_x0.5.lmdb" / "data.mdb").exists()
    again = call_step("C", s, *over)
    assert again.counts["assigned"] == 0


def test_missing_scale_artefacts_are_named(tmp_path: Path):
    s = make_dataset(tmp_path, input_size=[128, 96])
    run_pipeline(s, "ABCD")
    err = refusal("C", s, "scales=[1, 0.5]")
    assert "scale 0.5" in str(err) and "step A" in str(err)
    err = refusal("D", s, "scales=[1, 0.5]")
    assert "assignments_x0.5.lmdb" in str(err) and "step C" in str(err)
    # an index made with one scale is refused by a D with two
    call_step("A", s, "scales=[1, 0.5]")
    call_step("C", s, "scales=[1, 0.5]")
    call_step("C", s)
    err = refusal("D", s, "scales=[1, 0.5]")
    assert "scales" in str(err) and "step C" in str(err)


def test_streamed_distractors_at_every_scale(tmp_path: Path):
    """stream_distractors with scales [1, 0.5]: the distractors go through the network at
    both scales without stored features, and both assignment stores and the index are
    those of the normal path (A stores every scale's maps, C assigns), byte for byte."""
    from helpers_pipeline import dump_lmdb, files_of, textured

    rng = np.random.default_rng(5)
    for name, w, h in (("d_00", 128, 96), ("d_01", 96, 128), ("d_02", 112, 112)):
        p = tmp_path / "distractors" / f"{name}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        textured(rng, w, h).save(p, quality=90)
    s = make_dataset(tmp_path, input_size=[128, 96], path_distractors="distractors")
    over = ("scales=[1, 0.5]",)
    run_pipeline(s, "AB")
    for step in "AC":
        call_step(step, s, *over)
    models = f"path_models={tmp_path / 'run' / 'models'}"
    stream = (*over, "path_output=" + str(tmp_path / "streamed"), models,
              "stream_distractors=true")
    for step in "AC":
        call_step(step, s, *stream)
    for name in ("assignments.lmdb", "assignments_x0.5.lmdb"):
        normal, _ = dump_lmdb(tmp_path / "run" / name)
        streamed, _ = dump_lmdb(tmp_path / "streamed" / name)
        assert sum(k.startswith(b"distractors/") for k in streamed) == 3
        assert streamed == normal, name
    for store in (tmp_path / "streamed" / "features").glob("*.lmdb"):
        recs, _ = dump_lmdb(store)
        assert recs and not any(k.startswith(b"distractors/") for k in recs)
    a, b = files_of(tmp_path / "run" / "index"), files_of(tmp_path / "streamed" / "index")
    for name in a:
        if name != "meta.json":
            assert a[name] == b[name], name
