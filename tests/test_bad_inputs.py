"""The bad-input catalogue (issue 8): what a user gets for each input they can get wrong.

Every refusal is ONE line ``error: ...`` naming the culprit (settings key and file, image
or query id, artefact path and field), a non-zero exit code (2), no stack trace, and no
partial output. Corrupt images are not refusals: step A skips them, lists them in
``<store>.corrupted.txt`` and stores nothing for them; odd but valid images (CMYK, 16-bit,
palette transparency, 1x1) are decoded to the same pixels as an 8-bit RGB twin.

The steps run in-process through their library entry points, on settings loaded as the
command line loads them, on tiny generated data: a refusal is the UserError the command
line prints as that one line (test_cli_errors.py checks the printing itself).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers_pipeline import (
    DB_SIZES,
    assert_one_error,
    call_step,
    copy_dataset,
    dump_lmdb,
    make_dataset,
    refusal,
    run_pipeline,
    settings_dict,
    textured,
    tree,
    write_json,
)

# --------------------------------------------------------------------------- images


def _png_bomb(path: Path, w: int = 60000, h: int = 60000) -> None:
    """A valid-looking PNG whose header claims w x h pixels (3.6 G) in a few bytes."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _write_odd_images(img: Path, rng: np.random.Generator) -> dict[str, str]:
    """The catalogue's image files; returns id -> what it is."""
    good = textured(rng, 64, 48)
    good.save(img / "jpeg_ok.jpg", quality=90)
    data = (img / "jpeg_ok.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (img / "zero_bytes.jpg").write_bytes(b"")
    (img / "text_as_jpg.jpg").write_text("this is not a JPEG\n", encoding="utf-8")
    _png_bomb(img / "bomb.png")
    # CMYK JPEG and its RGB twin (the same decoded pixels, lossless)
    textured(rng, 64, 48).convert("CMYK").save(img / "cmyk.jpg", quality=95)
    with Image.open(img / "cmyk.jpg") as im:
        im.convert("RGB").save(img / "cmyk_twin.png")
    # 16-bit grey PNG (values v * 257) and its 8-bit twin (values v)
    v = rng.integers(0, 256, (48, 64)).astype(np.uint16)
    Image.fromarray(v * 257).save(img / "grey16.png")  # mode I;16
    Image.fromarray(v.astype(np.uint8)).convert("RGB").save(img / "grey16_twin.png")
    # palette image whose index 0 (a saturated red) is transparent; twin: white there
    idx = rng.integers(0, 4, (48, 64)).astype(np.uint8)
    pal = [255, 0, 0, 0, 90, 200, 30, 160, 60, 240, 220, 20]
    p = Image.fromarray(idx, mode="P")
    p.putpalette(pal + [0] * (768 - len(pal)))
    p.info["transparency"] = 0
    p.save(img / "palette_transparent.png", transparency=0)
    rgb = np.array(pal, np.uint8).reshape(4, 3)[idx]
    rgb[idx == 0] = 255
    Image.fromarray(rgb).save(img / "palette_transparent_twin.png")
    Image.fromarray(np.array([[[10, 200, 30]]], np.uint8)).save(img / "one_pixel.png")
    return {"truncated": "truncated", "zero_bytes": "zero-byte", "text_as_jpg": "not an image",
            "bomb": "too large", "missing_file": "not found"}


CORRUPT = ("truncated", "zero_bytes", "text_as_jpg", "bomb", "missing_file")
TWINS = ("cmyk", "grey16", "palette_transparent")


@pytest.fixture(scope="module")
def odd_images_run(tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    """One step-A run over a database holding every catalogue image (and an id whose
    file is missing): (store path, corrupted.txt as id -> reason, the step's summary line)."""
    root = tmp_path_factory.mktemp("odd")
    make_dataset(root, db_sizes=DB_SIZES[:2])
    rng = np.random.default_rng(5)
    reasons = _write_odd_images(root / "images", rng)
    ids = [*sorted(p.stem for p in (root / "images").iterdir()), "missing_file"]
    gt = json.loads((root / "gt.json").read_text())
    gt["imlist"] = ids
    gt["gnd"] = [{"bbx": g["bbx"], "ok": [0], "junk": []} for g in gt["gnd"]]
    write_json(root / "gt.json", gt)
    out = call_step("A", root / "settings.json").summary
    store = next((root / "run" / "features").glob("*.lmdb"))
    listed = {}
    for line in store.with_name(store.name[:-5] + ".corrupted.txt").read_text().splitlines():
        i, _, r = line.partition("\t")
        listed[i] = r
    assert set(listed) == set(CORRUPT), listed
    return store, {k: f"{v}|{listed[k]}" for k, v in reasons.items()}, out


@pytest.mark.parametrize("image_id", CORRUPT)
def test_corrupt_image_is_skipped_and_listed(odd_images_run, image_id):
    store, expect, out = odd_images_run
    keyword, reason = expect[image_id].split("|", 1)
    assert keyword in reason, reason
    assert "\n" not in reason and reason.strip()
    recs, meta = dump_lmdb(store)
    assert image_id.encode() not in recs  # nothing stored for it
    assert meta["complete"] is True
    assert f"{len(CORRUPT)} corrupt" in out


@pytest.mark.parametrize("image_id", TWINS)
def test_odd_but_valid_image_decodes_like_its_rgb_twin(odd_images_run, image_id):
    store, _, _ = odd_images_run
    recs, _ = dump_lmdb(store)
    a, b = recs[image_id.encode()], recs[f"{image_id}_twin".encode()]
    assert a == b  # same header (original size) and the same maps, bit for bit


def test_one_pixel_image_is_extracted(odd_images_run):
    from lib.features.feature_store import FeatureStore

    store, _, _ = odd_images_run
    with FeatureStore(store) as st:
        maps, size = st.get("one_pixel")
        ref = st.get("jpeg_ok")[0]["s6_expand"]  # a 64x48 landscape image
    assert size == (1, 1)
    m = maps["s6_expand"]
    assert m.shape == ref.shape and np.isfinite(m).all()  # resized to the landscape input


# --------------------------------------------------------------------------- settings


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    return make_dataset(tmp_path, db_sizes=DB_SIZES[:4])


def _with(settings: Path, drop: str | None = None, **changes) -> Path:
    s = json.loads(settings.read_text())
    s.update(changes)
    if drop:
        s.pop(drop)
    out = settings.with_name("bad.json")
    write_json(out, s)
    return out


SETTINGS_CASES = {
    "unknown_key": (dict(n_center=8), None, ("unknown settings key 'n_center'", "bad.json")),
    "wrong_type": (dict(pca_dim="16"), None, ("key 'pca_dim'", "expected an integer",
                                             "bad.json")),
    "missing_required": ({}, "path_gt", ("missing required key 'path_gt'", "bad.json")),
    "missing_path": (dict(path_images="no_such_folder"), None,
                     ("key 'path_images'", "does not exist", "no_such_folder")),
    "unknown_network": (dict(network="alexnet"), None, ("key 'network'", "'alexnet'")),
    "unknown_layer": (dict(layers=["conv9_9"]), None, ("'layers'", "conv9_9")),
}


@pytest.mark.parametrize("case", sorted(SETTINGS_CASES))
def test_bad_settings(ds, case):
    changes, drop, needles = SETTINGS_CASES[case]
    assert_one_error(refusal("A", _with(ds, drop, **changes)), *needles)
    assert tree(ds.parent / "run") == []


def test_n_centers_larger_than_the_samples(ds):
    run_pipeline(ds, "A")
    models = ds.parent / "run" / "models"
    assert_one_error(refusal("B", ds, "n_centers=5000"), "n_centers", "5000")
    assert tree(models) == [], "B left models behind after refusing"


# --------------------------------------------------------------------------- ground truth


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A finished A -> D run (settings path) the ground-truth/artefact cases start from."""
    root = tmp_path_factory.mktemp("built")
    s = make_dataset(root)
    run_pipeline(s, "ABCD")
    return s




def _gt_variant(s: Path, query: int, **gnd_changes) -> Path:
    gt = json.loads((s.parent / "gt.json").read_text())
    gt["gnd"][query].update(gnd_changes)
    p = s.parent / "gt_bad.json"
    write_json(p, gt)
    return p


def _d_refuses(s: Path, gt: Path, *needles: str) -> None:
    shutil.rmtree(s.parent / "run" / "bow")
    assert_one_error(refusal("D", s, f"path_gt={gt}"), *needles)
    assert not (s.parent / "run" / "bow").exists()


def test_query_box_outside_the_image(built, tmp_path):
    s = copy_dataset(built, tmp_path / "r")
    _d_refuses(s, _gt_variant(s, 1, bbx=[100, 100, 400, 300]), "query 'q_1'")


def test_query_box_with_zero_area(built, tmp_path):
    s = copy_dataset(built, tmp_path / "r")
    _d_refuses(s, _gt_variant(s, 0, bbx=[10, 10, 10, 30]), "q_0", "zero or negative area")


def test_query_image_missing_from_the_folder(built, tmp_path):
    s = copy_dataset(built, tmp_path / "r")
    gt = json.loads((s.parent / "gt.json").read_text())
    gt["qimlist"][1] = "q_absent"
    p = s.parent / "gt_bad.json"
    write_json(p, gt)
    _d_refuses(s, p, "q_absent")


def test_malformed_generic_ground_truth(built, tmp_path):
    s = copy_dataset(built, tmp_path / "r")
    _d_refuses(s, _gt_variant(s, 0, ok=["one", 2]), "gt_bad.json", "q_0", "'ok'")


def test_malformed_oxford_query_line(tmp_path):
    s = make_dataset(tmp_path, db_sizes=DB_SIZES[:2])
    gtd = tmp_path / "gt_files"
    gtd.mkdir()
    (gtd / "tower_1_query.txt").write_text("oxc1_img_00 12 x 40 30\n")
    for kind in ("good", "ok", "junk"):
        (gtd / f"tower_1_{kind}.txt").write_text("img_01\n")
    assert_one_error(refusal("A", _with(s, gt_format="oxford", path_gt="gt_files")),
                     "tower_1_query.txt", "line 1")
    assert tree(tmp_path / "run") == []


def test_empty_positive_set_is_left_out_of_the_mean(built, tmp_path):
    """Not an error: AP is undefined, so the query is left out of map.txt and of the
    mean, and results.json names it (map.txt never holds nan)."""
    s = copy_dataset(built, tmp_path / "r")
    gt = _gt_variant(s, 1, ok=[], junk=[])
    call_step("E", s, f"path_gt={gt}")
    lines = (s.parent / "run" / "bow" / "map.txt").read_text().split()
    assert len(lines) == 1 and float(lines[0]) >= 0  # q_1 has no positives: left out
    res = json.loads((s.parent / "run" / "bow" / "results.json").read_text())
    assert res["queries_without_positives"] == ["q_1"]
    assert res["per_query"]["q_1"] is None
    assert res["map"] == pytest.approx(float(lines[0]), abs=1e-4)


# --------------------------------------------------------------------------- artefacts


def _models_copy(s: Path) -> Path:
    src = s.parent / "run" / "models"
    dst = s.parent / "models_other"
    shutil.copytree(src, dst)
    return dst


def _c_refuses(s: Path, extra_and_needles: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    """Step C into a fresh output folder (A's store and the given models as inputs)
    refuses with one line and writes neither assignments nor an index."""
    extra, needles = extra_and_needles
    out = s.parent / "run_new"
    err = refusal("C", s, f"path_output={out}",
                  f"path_features={s.parent / 'run' / 'features'}", *extra)
    assert_one_error(err, *needles)
    assert tree(out) == [] or (not (out / "index").exists() and not (
        out / "assignments.lmdb").exists()), tree(out)


@pytest.mark.parametrize("field,value", [("layers", ["s5_expand"]), ("input_size", [96, 64])])
def test_models_from_another_network_setting(built, tmp_path, field, value):
    s = copy_dataset(built, tmp_path / "r")
    m = _models_copy(s)
    meta = json.loads((m / "codebook.json").read_text())
    meta["provenance"][field] = value
    write_json(m / "codebook.json", meta)
    _c_refuses(s, ((f"path_models={m}",), ("codebook", f"'{field}'")))


def test_truncated_npy(built, tmp_path):
    s = copy_dataset(built, tmp_path / "r")
    m = _models_copy(s)
    data = (m / "codebook.npy").read_bytes()
    (m / "codebook.npy").write_bytes(data[: len(data) - 40])
    _c_refuses(s, ((f"path_models={m}",), ("codebook.npy",)))


def test_feature_store_written_by_other_settings(built, tmp_path):
    s = copy_dataset(built, tmp_path / "r")
    _c_refuses(s, (("antialias=true", f"path_models={s.parent / 'run' / 'models'}"),
                   ("'antialias'",)))


def test_ranking_list_with_unknown_ids(built, tmp_path):
    s = copy_dataset(built, tmp_path / "r")
    bow = s.parent / "run" / "bow"
    f = bow / "lists" / "q_0.txt"
    f.write_text(f.read_text().replace("img_03", "ghost_image"))
    assert_one_error(refusal("E", s), "ghost_image")
    assert not (bow / "map.txt").exists() and not (bow / "results.json").exists()


def test_settings_dict_is_complete():
    """The helper's settings load (guards the fixtures above against schema drift)."""
    from lib.settings import SCHEMA_BY_NAME

    assert set(settings_dict()) <= set(SCHEMA_BY_NAME)


class _Payload:
    """Unpickling this would create ``marker`` (a stand-in for any code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_ground_truth_pickle_is_refused(tmp_path):
    s = make_dataset(tmp_path, db_sizes=DB_SIZES[:2])
    marker = tmp_path / "pwned"
    evil = {"imlist": ["img_00", "img_01"], "qimlist": ["q_0"],
            "gnd": [{"bbx": [1, 1, 20, 20], "easy": [0], "hard": [], "junk": [],
                     "x": _Payload(marker)}]}
    (tmp_path / "gnd_tiny.pkl").write_bytes(pickle.dumps(evil))
    assert_one_error(refusal("A", _with(s, gt_format="revisited", path_gt="gnd_tiny.pkl")),
                     "gnd_tiny.pkl", "refused to load", "system")
    assert not marker.exists()
    assert tree(tmp_path / "run") == []
