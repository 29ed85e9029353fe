"""Step D on hand-built artefacts (models, assignment maps, inverted file; no network):
the ranking-folder format, scores equal to an independent dense computation, masking,
deterministic ties, the query cache, and refusals naming the culprit."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.errors import UserError
from lib.groundtruth.loader import load_ground_truth
from lib.index.assignment_store import AssignmentStore
from lib.index.bow import centre_prior
from lib.index.encoding import database_vector
from lib.index.inverted_file import InvertedFile
from lib.provenance import expected_provenance, models_paths, training_fields
from lib.search.masks import query_weights
from lib.search.pooling import pooling_rankings
from lib.search.rankings import read_ranking_folder
from lib.search.step import bow_rankings
from lib.settings import load_settings
from lib.vocabulary.codebook import Codebook
from lib.vocabulary.pca import PCAWhitening

REPO = Path(__file__).resolve().parent.parent
K = 8
H0, W0 = 48, 64  # every image is landscape: maps are 3 x 4
# word maps of the database; img1 and img4 are identical (a tie), img2 shares nothing
MAPS = {
    "img0": [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]],
    "img1": [[1, 1, 1, 1], [1, 1, 1, 1], [3, 3, 3, 3]],
    "img2": [[7, 7, 7, 7], [7, 7, 7, 7], [7, 7, 7, 7]],
    "img3": [[0, 0, 0, 0], [5, 5, 5, 5], [2, 2, 2, 2]],
    "img4": [[1, 1, 1, 1], [1, 1, 1, 1], [3, 3, 3, 3]],
    "img5": [[0, 0, 6, 6], [0, 0, 6, 6], [6, 6, 6, 6]],
}
IDS = list(MAPS)


def _make_run(root: Path, box: list[float] | None = None, **extra) -> Path:
    """A dataset, settings file and the artefacts of steps B and C; returns the settings."""
    (root / "images").mkdir(parents=True)
    for i in IDS:
        Image.new("RGB", (W0, H0), (100, 100, 100)).save(root / "images" / f"{i}.jpg")
    gnd = [{"bbx": box, "ok": [5], "junk": [0]}, {"bbx": None, "ok": [0], "junk": [3]}]
    (root / "gnd.json").write_text(json.dumps({"imlist": IDS, "qimlist": ["img0", "img3"],
                                               "gnd": gnd}))
    cfg = {"dataset": "tiny", "gt_format": "generic", "path_images": "images",
           "path_gt": "gnd.json", "path_output": "run", "network": "efficientnet_lite0",
           "weights": "random", "layers": ["s6_expand"], "new_dim": [4, 3], "pca_dim": 4,
           "n_centers": K, "masking": 0, "weighting": "centre_prior", **extra}
    sp = root / "settings.json"
    sp.write_text(json.dumps(cfg))
    s = load_settings(sp)
    prov = expected_provenance(s)
    rng = np.random.default_rng(0)
    pca = PCAWhitening.fit(rng.normal(size=(60, 6)).astype(np.float32), 4)
    p_pca, p_cb = models_paths(s)
    pca.save(p_pca, {"provenance": prov, **training_fields(s)})
    cb = Codebook(rng.normal(size=(K, 4)).astype(np.float32))
    cb.save(p_cb, {"provenance": prov, **training_fields(s), "pca_hash": pca.content_hash()})
    meta = {"provenance": prov, "new_dim": [4, 3], "l2norm": True,
            "pca_hash": pca.content_hash(), "codebook_hash": cb.content_hash(),
            "n_centers": K, "assignment": "exact"}
    with AssignmentStore.create(AssignmentStore.path_for(s), meta) as st:
        st.put_many([(i, np.array(m, np.uint16), (H0, W0)) for i, m in MAPS.items()])
    vecs = [database_vector(np.array(MAPS[i]), "centre_prior", K) for i in IDS]
    InvertedFile.build(Path(s.path_output) / "index", vecs, K, IDS,
                       {**meta, "weighting": "centre_prior", "idf": False})
    return sp


def _dense_db() -> np.ndarray:
    x = np.zeros((len(IDS), K))
    for n, i in enumerate(IDS):
        m = np.array(MAPS[i])
        np.add.at(x[n], m.ravel(), centre_prior(3, 4).ravel())
        x[n] /= np.linalg.norm(x[n])
    return x


def _run(sp: Path, **changes):
    s = load_settings(sp, overrides=changes)
    gt = load_ground_truth(s)
    bow_rankings(s, gt, Path(s.path_output) / "bow")
    return s, read_ranking_folder(Path(s.path_output) / "bow", gt.db_ids)


def test_global_search_lists_scores_and_ties(tmp_path):
    sp = _make_run(tmp_path)
    s, r = _run(sp, query_weighting="counts")  # the paper's whole-image query
    assert r.queries == ["img0", "img3"]
    scores = np.load(Path(s.path_output) / "bow" / "scores.npy")
    x = _dense_db()
    for qi, q in enumerate(r.queries):
        hist = np.bincount(np.array(MAPS[q]).ravel(), minlength=K).astype(float)
        ref = x @ (hist / np.linalg.norm(hist))
        np.testing.assert_allclose(scores[qi], ref, atol=1e-3)
        lst = r.lists[q]
        assert sorted(lst) == sorted(IDS)  # every database image exactly once
        # best first; equal scores (img1/img4 and the zero-score images) in database order
        want = [IDS[i] for i in np.lexsort((np.arange(len(IDS)), -np.round(ref, 4)))]
        assert lst == want
    assert r.lists["img0"][0] == "img0"
    assert r.lists["img0"].index("img1") < r.lists["img0"].index("img4")
    assert r.lists["img0"][-1] == "img2"  # no shared word: score 0, last
    assert r.meta["n_queries"] == 2 and r.meta["ms_per_query"]["total"] > 0
    assert r.meta["query_cache"]["from_database"] == 2  # queries are database images


def test_whole_image_query_weighted_by_the_centre_prior(tmp_path):
    """The default: a query without a box weighs its cells by the centre prior, as the
    database images are weighted (the clutter at the border counts less)."""
    from lib.index.bow import centre_prior

    sp = _make_run(tmp_path)
    s, r = _run(sp)
    assert s.query_weighting == "centre_prior"
    scores = np.load(Path(s.path_output) / "bow" / "scores.npy")
    x = _dense_db()
    for qi, q in enumerate(r.queries):
        m = np.array(MAPS[q])
        hist = np.bincount(m.ravel(), weights=centre_prior(*m.shape).ravel(), minlength=K)
        np.testing.assert_allclose(scores[qi], x @ (hist / np.linalg.norm(hist)), atol=1e-3)
    counts = _run(sp, query_weighting="counts")[0]
    assert not np.allclose(np.load(Path(counts.path_output) / "bow" / "scores.npy"), scores,
                           atol=1e-3)


def test_local_search_uses_only_the_box_words(tmp_path):
    # box on the left half of the two top rows of img0: words 0 only (cells (0..1, 0..1))
    sp = _make_run(tmp_path, box=[0, 0, 32, 32])
    s, r = _run(sp, masking=1, query_weighting="counts")  # the paper's rule
    scores = np.load(Path(s.path_output) / "bow" / "scores.npy")
    x = _dense_db()
    q = np.zeros(K)
    q[0] = 1.0  # four cells of word 0 -> normalised to a single word
    np.testing.assert_allclose(scores[0], x @ q, atol=1e-3)
    ref = x @ q
    assert r.lists["img0"] == [IDS[i] for i in np.lexsort((np.arange(6), -np.round(ref, 4)))]
    assert "img1" not in r.lists["img0"][:3]  # word 1 lies outside the box
    # the second query has no box: masking 1 falls back to all its words
    hist = np.bincount(np.array(MAPS["img3"]).ravel(), minlength=K).astype(float)
    np.testing.assert_allclose(scores[1], x @ (hist / np.linalg.norm(hist)), atol=1e-3)


def test_query_cache_is_reused(tmp_path):
    sp = _make_run(tmp_path)
    s, _ = _run(sp)
    cache = Path(s.path_output) / "query_words.lmdb"
    # key: image id, view, blake2b-128 of the query file's bytes
    digest = {q: hashlib.blake2b((tmp_path / "images" / f"{q}.jpg").read_bytes(),
                                 digest_size=16).hexdigest() for q in ("img0", "img3")}
    with AssignmentStore(cache) as st:
        assert sorted(st.ids()) == [f"img0#orig#{digest['img0']}",
                                    f"img3#orig#{digest['img3']}"]
        np.testing.assert_array_equal(st.get(f"img3#orig#{digest['img3']}")[0], MAPS["img3"])
    _, r = _run(sp, masking=2)
    assert r.meta["query_cache"] == {"cached": 2, "from_database": 0, "network": 0}


def test_cached_query_still_needs_its_file(tmp_path):
    # queries served from the database store and the cache: a missing photo still fails
    sp = _make_run(tmp_path)
    _run(sp)
    (tmp_path / "images" / "img3.jpg").unlink()
    with pytest.raises(UserError, match="image 'img3' not found under"):
        _run(sp, masking=2)


def test_bad_box_names_the_query(tmp_path):
    sp = _make_run(tmp_path, box=[10, 10, 30, 10])  # zero area
    with pytest.raises(UserError, match="img0"):
        _run(sp, masking=1)
    sp2 = _make_run(tmp_path / "b", box=[100, 100, 120, 120])
    with pytest.raises(UserError, match="query 'img0'.*outside"):
        _run(sp2, masking=1)


def test_mismatched_artefacts_are_refused(tmp_path):
    sp = _make_run(tmp_path)
    with pytest.raises(UserError, match="weighting"):
        _run(sp, weighting="counts")  # the index was built with the centre prior
    with pytest.raises(UserError, match="n_centers"):
        _run(sp, n_centers=16)  # the models were trained with 8 words


def test_script_end_to_end_and_exit_code(tmp_path):
    sp = _make_run(tmp_path)
    script = REPO / "bow_pipeline" / "D_rankings_BoW.py"
    ok = subprocess.run([sys.executable, str(script), str(sp), "-q"], capture_output=True,
                        text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "2 queries ranked" in ok.stdout
    lst = (tmp_path / "run" / "bow" / "lists" / "img3.txt").read_text().split()
    assert lst[0] == "img3" and len(lst) == len(IDS)
    bad = subprocess.run([sys.executable, str(script), str(sp), "--set", "idf=true"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2
    assert "idf" in bad.stderr and "Traceback" not in bad.stderr
    help_ = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                           text=True)
    assert "Outputs" in help_.stdout and "lists/<query>.txt" in help_.stdout


def _feature_store(sp: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from lib.features.feature_store import FeatureStore

    s = load_settings(sp)
    maps = {i: rng.random((5, 3, 4)).astype(np.float32) for i in IDS}
    maps["img4"] = maps["img1"].copy()  # a tie
    meta = {"provenance": expected_provenance(s), "layers": ["s6_expand"],
            "feature_dtype": "float32", "count": len(IDS)}
    with FeatureStore.create(FeatureStore.path_for(s), meta) as st:
        st.put_many([(i, {"s6_expand": m}, (H0, W0)) for i, m in maps.items()])
    return maps


@pytest.mark.parametrize("method", ["sum", "max", "gem"])
def test_pooling_baseline_matches_numpy(tmp_path, method):
    sp = _make_run(tmp_path, box=[0, 0, 32, 24])
    maps = _feature_store(sp, np.random.default_rng(3))
    s = load_settings(sp, overrides={"pooling": method, "pooling_pca": False, "masking": 1})
    gt = load_ground_truth(s)
    out = Path(s.path_output) / f"pooling_{method}"
    meta = pooling_rankings(s, gt, out)
    r = read_ranking_folder(out, gt.db_ids)
    scores = np.load(out / "scores.npy")

    def pool(m, w=None):
        x = m * (1 if w is None else w[None])
        if method == "sum":
            v = x.sum((1, 2))
        elif method == "max":
            v = x.max((1, 2))
        else:
            v = (np.clip(x, 1e-6, None) ** 3).mean((1, 2)) ** (1 / 3)
        return v / np.linalg.norm(v)

    db = np.stack([pool(maps[i]) for i in IDS])
    # query img0's box covers the top-left quarter: the soft mask on the 3x4 map
    soft = np.zeros((3, 4))
    soft[0, 0:2] = 1.0
    soft[1, 0:2] = 0.5  # cell row 1 samples pixels 23.5..: half in, half out of y < 24
    w0 = query_weights(1, (0, 0, 32, 24), (H0, W0), (3, 4), pooling=True)
    np.testing.assert_allclose(w0, soft, atol=1e-6)
    np.testing.assert_allclose(scores[0], db @ pool(maps["img0"], w0), atol=1e-5)
    np.testing.assert_allclose(scores[1], db @ pool(maps["img3"]), atol=1e-5)
    for qi, q in enumerate(r.queries):
        want = [IDS[i] for i in np.argsort(-scores[qi].astype(np.float64), kind="stable")]
        assert r.lists[q] == want
    lst = r.lists["img3"]
    assert lst.index("img4") == lst.index("img1") + 1  # equal scores: database order
    assert meta["dim"] == 5 and meta["pca"] is None


def test_pooling_with_pca_caps_the_dimension(tmp_path):
    sp = _make_run(tmp_path)
    _feature_store(sp, np.random.default_rng(4))
    s = load_settings(sp, overrides={"pooling": "sum", "pca_dim": 512})
    gt = load_ground_truth(s)
    meta = pooling_rankings(s, gt, Path(s.path_output) / "pooling_sum")
    assert meta["pca"]["dim"] == 5  # min(pca_dim, channels, images - 1)
    r = read_ranking_folder(Path(s.path_output) / "pooling_sum", gt.db_ids)
    assert r.lists["img0"][0] == "img0" and r.lists["img3"][0] == "img3"
