"""kernel = asmk through the pipeline: step C stores each image's signatures with its
word map and builds the ASMK postings beside the BoW ones, streamed distractors get them
too, an interrupted C resumes to the same bytes, and step D scores with the kernel.

The kernel's arithmetic is tested on its own in tests/test_asmk.py; here the question is
whether the pipeline feeds it the right features and stores what it computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_pipeline import (
    call_step,
    dump_lmdb,
    files_of,
    load,
    make_dataset,
    refusal,
    run_outputs,
    run_pipeline,
    run_with_fault,
    textured,
)

from lib.index import asmk
from lib.index.assignment_store import (
    AssignmentStore,
    decode,
    decode_both,
    decode_signature,
    encode,
)
from lib.index.inverted_file import InvertedFile
from lib.provenance import assignment_record, load_models

ASMK = ("kernel=asmk",)


@pytest.fixture(scope="module")
def asmk_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("asmk")
    s = make_dataset(root, kernel="asmk", pca_dim=12, n_centers=6, new_dim=[6, 4])
    run_pipeline(s)
    return root, s


def _reference_images(settings_path: Path) -> tuple[list[str], list[tuple]]:
    """Every database image aggregated from step A's features, independently of step C."""
    from lib.features.feature_store import FeatureStore
    from lib.features.local_features import LocalFeatureReader

    s = load(settings_path)
    pca, cb = load_models(s)
    store = FeatureStore(FeatureStore.path_for(s))
    reader = LocalFeatureReader(store, list(s.new_dim), l2norm=True, pca=pca)
    ids = json.loads((settings_path.parent / "gt.json").read_text())["imlist"]
    images = []
    for i in ids:
        f = np.asarray(reader.features(i), np.float32)
        images.append(asmk.aggregate(f, cb.assign(f), cb.centroids))
    store.close()
    return ids, images


def test_index_holds_the_signatures_of_every_image(asmk_run: tuple[Path, Path]) -> None:
    root, s = asmk_run
    ids, images = _reference_images(s)
    inv = InvertedFile.load(root / "run" / "index")
    assert inv.image_ids == ids and inv.meta["kernel"] == "asmk"
    assert inv.meta["asmk_bits"] == 12
    offsets, docs, sigs, weights = asmk.build_postings(images, 6)
    np.testing.assert_array_equal(inv.asmk_offsets, offsets)
    np.testing.assert_array_equal(inv.asmk_docs, docs)
    np.testing.assert_array_equal(inv.asmk_signatures, sigs)
    np.testing.assert_array_equal(inv.asmk_weights, weights)
    # the assignment store keeps them with each word map
    with AssignmentStore(root / "run" / "assignments.lmdb") as st:
        for i, (uw, sg) in zip(ids, images):
            got = st.get_signature(i)
            assert got is not None
            np.testing.assert_array_equal(got[0], uw)
            np.testing.assert_array_equal(got[1], sg)


def test_step_d_ranks_by_the_kernel(asmk_run: tuple[Path, Path]) -> None:
    from lib.groundtruth.loader import load_ground_truth
    from lib.search.query_encoding import QueryEncoder

    root, s = asmk_run
    settings = load(s)
    _, images = _reference_images(s)
    offsets, docs, sigs, weights = asmk.build_postings(images, 6)
    scores = np.load(root / "run" / "bow" / "scores.npy")
    enc = QueryEncoder(settings)
    try:
        for qi, q in enumerate(load_ground_truth(settings).queries):
            eq = enc.encode(q)
            assert eq.asmk is not None
            # the box selects the query's features: other residual sums than the whole
            whole = enc.asmk_signature(q.image, None, eq.map_hw)
            assert not np.array_equal(eq.asmk[1], whole[1])
            ref = asmk.score_postings(eq.asmk[0], eq.asmk[1], offsets, docs, sigs, weights,
                                      len(images), alpha=3.0, tau=0.0, n_bits=12,
                                      per_doc=False)
            np.testing.assert_allclose(scores[qi], ref, rtol=1e-6, atol=1e-7)
            assert scores[qi].max() > 0
    finally:
        enc.close()


def test_weighted_kernel_with_flat_selectivity_is_the_papers_bow(tmp_path: Path) -> None:
    """asmk_weighting = bow weighs each word as the BoW vectors do; with sigma = 1 for
    every pair (alpha 0, tau -1) and one word per query feature it is BoW's cosine."""
    s = make_dataset(tmp_path, new_dim=[6, 4])
    run_pipeline(s, "ABCD")
    bow = np.load(tmp_path / "run" / "bow" / "scores.npy")
    flat = ("kernel=asmk", "asmk_weighting=bow", "asmk_alpha=0", "asmk_tau=-1",
            "query_ma=1")
    call_step("C", s, *flat)
    call_step("D", s, *flat)
    weighted = np.load(tmp_path / "run" / "bow" / "scores.npy")
    # the BoW index stores weights in 16-bit fixed point, the ASMK postings in float32
    np.testing.assert_allclose(weighted, bow, atol=2e-4)
    assert np.array_equal(np.argsort(-weighted, axis=1)[:, :3], np.argsort(-bow, axis=1)[:, :3])
    call_step("D", s, *flat[:2])  # the reference selectivity: other scores
    assert not np.allclose(np.load(tmp_path / "run" / "bow" / "scores.npy"), bow, atol=1e-3)
    err = refusal("D", s, "kernel=asmk")  # index made with the other word weights
    assert "asmk_weighting" in str(err)


def test_bow_records_are_unchanged_by_kernels(tmp_path: Path) -> None:
    s = load(make_dataset(tmp_path))
    rec = assignment_record(s, *_fake_models())
    assert "kernel" not in rec and "asmk_bits" not in rec
    rec2 = assignment_record(s.replace(kernel="asmk", asmk_bits=4), *_fake_models())
    assert rec2["kernel"] == "asmk" and rec2["asmk_bits"] == 4


def _fake_models():
    class _M:
        k, dim = 8, 8

        def content_hash(self) -> str:
            return "0" * 16

    return _M(), _M()


def test_changing_the_kernel_rebuilds_c_and_d_refuses_a_bow_index(tmp_path: Path) -> None:
    s = make_dataset(tmp_path)
    run_pipeline(s, "ABC")
    err = refusal("D", s, *ASMK)
    assert "kernel" in str(err) and "rerun step C" in str(err)
    call_step("C", s, *ASMK)  # the BoW store is rebuilt with signatures
    inv = InvertedFile.load(tmp_path / "run" / "index")
    assert inv.asmk_signatures is not None and inv.meta["kernel"] == "asmk"
    call_step("D", s, *ASMK)


def test_interrupted_c_resumes_to_the_same_bytes(asmk_run: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    root, _ = asmk_run
    ref = run_outputs(root / "run", root)
    for at in ("assignments.txn:after@1", "atomic index:inside@1"):
        dst = tmp_path / at.split(":")[0].replace(" ", "_")
        shutil.copytree(root, dst)
        for name in ("assignments.lmdb", "index", "bow", "query_words.lmdb"):
            shutil.rmtree(dst / "run" / name, ignore_errors=True)
        p = run_with_fault("C", dst / "settings.json", at=at)
        assert p.returncode == -9, p.stderr[-2000:]
        run_pipeline(dst / "settings.json", "CDE")
        got = run_outputs(dst / "run", [dst, root])
        assert sorted(got) == sorted(ref)
        for k in ref:
            assert got[k] == ref[k], f"{at}: {k} differs from the uninterrupted run"


def test_streamed_distractors_get_signatures(tmp_path: Path) -> None:
    from lib.features.extraction import run_extraction
    from lib.groundtruth.loader import DISTRACTOR_PREFIX, load_ground_truth
    rng = np.random.default_rng(7)
    for name, w, h in (("d_00", 64, 48), ("d_01", 48, 64), ("sub/d_02", 72, 72)):
        f = tmp_path / "distractors" / f"{name}.jpg"
        f.parent.mkdir(parents=True, exist_ok=True)
        textured(rng, w, h).save(f, quality=90)
    normal = make_dataset(tmp_path, path_distractors="distractors", path_output="run_n",
                          kernel="asmk")
    run_pipeline(normal, "ABC")
    stream = tmp_path / "stream.json"
    stream.write_text(normal.read_text().replace('"run_n"', '"run_s"'))
    over = (f"path_models={tmp_path / 'run_n' / 'models'}", "stream_distractors=true")
    s = load(stream, *over)
    ids = [i for i in load_ground_truth(s).db_ids if not i.startswith(DISTRACTOR_PREFIX)]
    run_extraction(s, ids)
    call_step("C", stream, *over)
    n_recs, _ = dump_lmdb(tmp_path / "run_n" / "assignments.lmdb")
    s_recs, _ = dump_lmdb(tmp_path / "run_s" / "assignments.lmdb")
    streamed = [k for k in s_recs if k.startswith(b"distractors/")]
    assert streamed and s_recs == n_recs
    assert all(decode_signature(s_recs[k], "x") is not None for k in streamed)
    a, b = files_of(tmp_path / "run_n" / "index"), files_of(tmp_path / "run_s" / "index")
    for name in ("asmk_offsets.npy", "asmk_docs.npy", "asmk_signatures.npy",
                 "asmk_weights.npy"):
        assert a[name] == b[name], name


def test_assignment_records_with_signatures_round_trip() -> None:
    words = np.array([[1, 2], [2, 3]], np.uint16)
    sig = (np.array([1, 2, 3], np.uint32), np.arange(12, dtype=np.uint8).reshape(3, 4))
    buf = encode(words, (20, 30), sig)
    assert buf[:4] == b"ASG4"  # map + signatures + CRC-32 trailer
    w, hw = decode(buf, "r")
    np.testing.assert_array_equal(w, words)
    assert hw == (20, 30)
    uw, sg = decode_signature(buf, "r")
    np.testing.assert_array_equal(uw, sig[0])
    np.testing.assert_array_equal(sg, sig[1])
    plain = encode(words, (20, 30))
    assert plain[:4] == b"ASG3" and decode_signature(plain, "r") is None
    # one read for both (step C's pass with BoW weights)
    w2, hw2, (uw2, sg2) = decode_both(buf, "r")
    np.testing.assert_array_equal(w2, words)
    assert hw2 == (20, 30)
    np.testing.assert_array_equal(uw2, sig[0])
    np.testing.assert_array_equal(sg2, sig[1])
    w3, _, none = decode_both(plain, "r")
    np.testing.assert_array_equal(w3, words)
    assert none is None
    from lib.errors import UserError

    with pytest.raises(UserError, match="CRC-32"):
        decode_both(buf[:-1], "r")

    # a truncated record fails its CRC-32; one of the older format (ASG2: no trailer)
    # fails the length its header implies
    with pytest.raises(UserError, match="CRC-32"):
        decode(buf[:-1], "r")
    with pytest.raises(UserError, match="CRC-32"):
        decode(buf[: len(plain) + 3], "r")
    old, old_plain = b"ASG2" + buf[4:-4], b"ASG1" + plain[4:-4]
    assert decode_signature(old, "r")[1].tobytes() == sg.tobytes()
    with pytest.raises(UserError, match="bytes"):
        decode(old[:-1], "r")
    with pytest.raises(UserError, match="truncated"):
        decode(old[: len(old_plain) + 3], "r")


@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_query_expansion_averages_kernel_scores(asmk_run: tuple[Path, Path],
                                                tmp_path: Path, alpha: float) -> None:
    """With kernel = asmk, expansion stays in the kernel: the final scores are the
    weighted mean of the query's scores (weight 1) and those of its top images' stored
    signatures used as queries (weight (first score / the best one's) ** qe_alpha; 0
    is the plain mean), an expansion image's own score without its own vote."""
    root, s = asmk_run
    dst = tmp_path / "qe"
    shutil.copytree(root, dst)
    over = ("query_expansion=gqe", "qe_top=2", "rerank=false", f"qe_alpha={alpha}")
    call_step("D", dst / "settings.json", *over)
    got = np.load(dst / "run" / "bow" / "scores.npy")
    first = np.load(root / "run" / "bow" / "scores.npy")  # the same queries, no expansion
    ids, images = _reference_images(s)
    offsets, docs, sigs, weights = asmk.build_postings(images, 6)
    uneven = 0
    for qi in range(first.shape[0]):
        top = np.argsort(-first[qi], kind="stable")[:2]
        total = first[qi].astype(np.float64)
        wts = (first[qi][top].astype(np.float64) / first[qi][top[0]]) ** alpha
        uneven += int(wts[1] < 0.99)
        denom = np.full(total.size, 1 + wts.sum())
        for d, wt in zip(top, wts):
            uw, sg = images[d]
            si = asmk.score_postings(uw, sg, offsets, docs, sigs, weights, len(ids),
                                     n_bits=12, per_doc=False)
            total += wt * si
            total[d] -= wt * si[d]  # no vote for itself
            denom[d] -= wt
        np.testing.assert_allclose(got[qi], total / denom, rtol=1e-5, atol=1e-6)
    assert alpha == 0 or uneven  # the weights were not all 1


def test_weights_of_words_reads_the_bow_vector() -> None:
    """The kernel's BoW weights of an image's aggregated words: the word's value in the
    sparse vector, 0 for a word the vector lacks (BoW drops zero-weight words)."""
    from lib.index.encoding import weights_of_words

    vec = (np.array([2, 5, 9], np.int64), np.array([0.5, 0.25, 0.125], np.float32))
    np.testing.assert_array_equal(weights_of_words(vec, np.array([0, 2, 6, 9, 12])),
                                  [0.0, 0.5, 0.0, 0.125, 0.0])
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
    np.testing.assert_array_equal(weights_of_words(empty, np.array([1, 3])), [0.0, 0.0])
