"""Step A end to end on generated images: orientation, corrupt files, exact resume after
an interruption, refusal of a mismatching store, the step's entry point
(lib/features/extraction.py, lib/features/step.py). Random Lite0 weights at a tiny input size."""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from lib.errors import ArtefactMismatchError
from lib.features.extraction import Extractor, run_extraction
from lib.features.feature_store import FeatureStore, corrupted_path
from lib.settings import load_settings

# (id, width, height); squares are landscape
SIZES = [("p/0", 40, 60), ("l/1", 70, 50), ("sq", 50, 50), ("p/3", 30, 45), ("l/4", 90, 40),
         ("p/5", 44, 66), ("l/6", 64, 48)]


def _dataset(tmp_path: Path, **overrides) -> Path:
    img = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, w, h in SIZES:
        (img / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            img / f"{name}.jpg", quality=90)
    (img / "zero.jpg").write_bytes(b"")
    (img / "text.png").write_text("not a png")
    ids = [n for n, _, _ in SIZES] + ["zero", "text"]
    gt = {"imlist": ids, "qimlist": ["p/0"], "gnd": [{"bbx": None, "ok": [1], "junk": []}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    s = {"dataset": "tiny", "gt_format": "generic", "path_images": "images",
         "path_gt": "gt.json", "path_output": "run", "network": "efficientnet_lite0",
         "weights": "random", "layers": ["s6_expand", "head"], "input_size": [48, 32],
         "batch_size": 2, "num_workers": 0, "device": "cpu",
         "n_centers": 4,  # step A refuses a vocabulary the set could never train
         **overrides}
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(s))
    return path


def _dump(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = {bytes(k): bytes(v) for k, v in txn.cursor()}
    env.close()
    return out


def _ids(settings) -> list[str]:
    from lib.groundtruth.loader import load_ground_truth

    return load_ground_truth(settings).db_ids


def test_extraction_orientation_corrupt_and_exact_resume(tmp_path):
    s = load_settings(_dataset(tmp_path))
    ids = _ids(s)
    full = tmp_path / "full.lmdb"
    r = run_extraction(s, ids, full)
    assert (r["extracted"], r["skipped"], r["corrupt"], r["count"]) == (7, 0, 2, 7)
    bad = corrupted_path(full).read_text().splitlines()
    assert [b.split("\t")[0] for b in bad] == ["text", "zero"]
    assert "zero-byte" in bad[1] and "not an image" in bad[0]
    with FeatureStore(full) as st:
        assert st.ids() == sorted(n for n, _, _ in SIZES)
        assert st.meta["count"] == 7 and st.meta["complete"] is True
        assert st.meta["provenance"]["weights"] == "random"
        for name, w, h in SIZES:
            maps, size = st.get(name)
            assert size == (h, w)
            portrait = h > w
            assert maps["s6_expand"].shape == ((672, 3, 2) if portrait else (672, 2, 3))
            assert maps["head"].shape == ((1280, 2, 1) if portrait else (1280, 1, 2))
    # the same maps as the single-image extractor (the query side), up to float16
    ext = Extractor(s)
    from lib.features.images import load_image

    one = ext.extract(load_image(tmp_path / "images" / "l/4.jpg"))
    with FeatureStore(full) as st:
        assert np.allclose(st.get("l/4")[0]["s6_expand"], one["s6_expand"], atol=2e-2,
                           rtol=1e-2)

    # interrupted after 2 batches, then resumed: byte-identical to the uninterrupted run
    part = tmp_path / "part.lmdb"
    r1 = run_extraction(s, ids, part, stop_after_batches=2)
    assert r1["interrupted"] and r1["extracted"] == 4
    with FeatureStore(part) as st:
        assert st.meta["complete"] is False and len(st) == 4
    r2 = run_extraction(s, ids, part)
    assert (r2["extracted"], r2["skipped"], r2["corrupt"]) == (3, 4, 2)
    a, b = _dump(full), _dump(part)
    ma, mb = json.loads(a.pop(b"__meta__")), json.loads(b.pop(b"__meta__"))
    assert a == b
    ma.pop("created"), mb.pop("created")
    assert ma == mb
    assert corrupted_path(part).read_text() == corrupted_path(full).read_text()
    # rerun: nothing to do
    r3 = run_extraction(s, ids, full)
    assert (r3["extracted"], r3["skipped"]) == (0, 7)


def test_mismatching_store_is_refused(tmp_path):
    s = load_settings(_dataset(tmp_path, layers=["s6_expand"]))
    ids = _ids(s)[:3]
    path = tmp_path / "st.lmdb"
    run_extraction(s, ids, path)
    with pytest.raises(ArtefactMismatchError, match="field 'antialias'"):
        run_extraction(s.replace(antialias=True), ids, path)
    with pytest.raises(ArtefactMismatchError, match="field 'feature_dtype'"):
        run_extraction(s.replace(feature_dtype="float32"), ids, path)


def test_step_runs_with_a_worker_and_refuses_a_mismatch(tmp_path):
    """Step A's entry point (lib/features/step.py) with a decoding worker: summary line,
    store; a mismatching store is refused (exit code 2) and the lock released."""
    from lib.features.step import extract_features

    cfg = _dataset(tmp_path, layers=["s6_expand"], num_workers=1, batch_size=3)
    res = extract_features(load_settings(cfg))
    assert "A: 7 extracted, 0 already stored, 2 corrupt" in res.summary
    assert (res.step, res.counts["extracted"], res.counts["corrupt"]) == ("A", 7, 2)
    store = tmp_path / "run" / "features" / "efficientnet_lite0-random-s6_expand-48x32-fixed.lmdb"
    assert res.outputs == (store,)
    assert len(FeatureStore(store)) == 7
    with pytest.raises(ArtefactMismatchError, match="field 'antialias'") as e:
        extract_features(load_settings(cfg, ["antialias=true"]))
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert (tmp_path / "run" / ".lock").exists() is False
