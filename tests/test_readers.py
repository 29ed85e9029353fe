"""Every ground-truth reader on small fixtures in the exact official formats
(tests/fixtures/: Oxford gt_files, Paris gt_data, a TRECVid qrels; revisited pickles are
built here), dispatch through the settings, and the restricted unpickler."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.errors import UserError
from lib.groundtruth.loader import load_ground_truth
from lib.groundtruth.oxford_paris import read_oxford, read_paris
from lib.groundtruth.revisited import load_restricted_pickle, read_revisited
from lib.groundtruth.trecvid import read_qrels, read_trecvid, shot_of
from lib.settings import load_settings

FIX = Path(__file__).resolve().parent / "fixtures"


def _touch_images(root: Path, names) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / f"{n}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{n}.jpg").touch()
    return root


def test_oxford_reader(tmp_path: Path) -> None:
    imgs = _touch_images(tmp_path / "images", [
        "all_souls_000013", "all_souls_000026", "all_souls_000091", "all_souls_000051",
        "all_souls_000183", "radcliffe_camera_000519", "radcliffe_camera_000095",
        "magdalen_000001"])
    gt = read_oxford(FIX / "oxford_gt", imgs, "oxford5k")
    assert gt.protocol == "oxford" and gt.db_ids == sorted(gt.db_ids) and len(gt.db_ids) == 8
    assert [q.name for q in gt.queries] == ["all_souls_1", "all_souls_2", "radcliffe_camera_1"]
    q = gt.queries[0]
    assert q.image == "all_souls_000013"  # oxc1_ stripped
    assert q.bbox == (136.5, 34.1, 648.5, 955.7)
    # good (a duplicate line included) and ok merged
    assert q.positives == {"all_souls_000091", "all_souls_000026", "all_souls_000051"}
    assert q.junk == {"all_souls_000183"} and q.topic == "all_souls"
    assert gt.queries[2].topic == "radcliffe_camera"
    assert gt.queries[1].positives == {"all_souls_000013", "all_souls_000091"}  # empty ok


def test_paris_reader_and_errors(tmp_path: Path) -> None:
    imgs = _touch_images(tmp_path / "images", ["paris_defense_000605", "paris_eiffel_000266"])
    gt = read_paris(FIX / "paris_gt", imgs, "paris6k")
    assert [q.name for q in gt.queries] == ["defense_1", "eiffel_1"]
    assert gt.queries[0].image == "paris_defense_000605"
    assert gt.queries[0].bbox == (130.0, 17.0, 843.0, 732.0)
    assert gt.queries[1].positives == {"paris_eiffel_000266", "paris_eiffel_000105"}
    assert gt.queries[1].topic == "eiffel"
    bad = tmp_path / "gt"
    bad.mkdir()
    for f in (FIX / "paris_gt").glob("defense_1_*"):
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "defense_1_ok.txt").unlink()
    with pytest.raises(UserError, match="defense_1_ok.txt: ground-truth file missing"):
        read_paris(bad, imgs, "p")
    (bad / "defense_1_ok.txt").touch()
    (bad / "defense_1_query.txt").write_text("paris_defense_000605 130 17 abc 732\n")
    with pytest.raises(UserError, match="defense_1_query.txt, line 1"):
        read_paris(bad, imgs, "p")


def _gnd(arrays: bool) -> dict:
    conv = (lambda v: np.array(v, dtype=np.int64)) if arrays else list
    return {
        "imlist": ["all_souls_000001", "oxford_000002", "ashmolean_000003", "x_4"],
        "qimlist": ["all_souls_000013", "bodleian_000007"],
        "gnd": [{"bbx": [136.5, 34.1, 648.5, 955.7], "easy": conv([0]), "hard": conv([2]),
                 "junk": conv([1])},
                {"bbx": [1.0, 2.0, 30.0, 40.0], "easy": conv([3]), "hard": conv([]),
                 "junk": conv([])}],
    }


@pytest.mark.parametrize("arrays, protocol", [(False, 2), (True, 2), (True, 5)])
def test_revisited_reader(tmp_path: Path, arrays: bool, protocol: int) -> None:
    f = tmp_path / "gnd_roxford5k.pkl"
    f.write_bytes(pickle.dumps(_gnd(arrays), protocol=protocol))
    gt = read_revisited(f, tmp_path, "roxford5k")
    assert gt.protocol == "revisited" and gt.db_ids[1] == "oxford_000002"
    q = gt.queries[0]
    assert q.name == q.image == "all_souls_000013"
    assert q.easy == {"all_souls_000001"} and q.hard == {"ashmolean_000003"}
    assert q.positives == q.easy | q.hard and q.junk == {"oxford_000002"}
    assert q.bbox == pytest.approx((136.5, 34.1, 648.5, 955.7))
    assert gt.queries[1].hard == frozenset()
    # a folder holding gnd_<name>.pkl works too
    assert read_revisited(tmp_path, tmp_path, "roxford5k").db_ids == gt.db_ids


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "gnd_evil.pkl"
    f.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil()]}))
    with pytest.raises(UserError, match=r"refused to load \(global '(posix|os|nt)\.system' "
                                        "is not allowed"):
        read_revisited(f, tmp_path, "evil")
    f.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": eval}))
    with pytest.raises(UserError, match="builtins.eval"):
        load_restricted_pickle(f)
    f.write_bytes(b"\x80\x02}q\x00")  # truncated
    with pytest.raises(UserError, match="not a readable ground-truth pickle"):
        load_restricted_pickle(f)


@pytest.mark.parametrize("opcode, length", [(b"\x8e", 2**40), (b"\x8e", 2**34),
                                            (b"\x8d", 2**33)])
def test_pickle_claiming_huge_lengths_is_refused_without_allocating(
        tmp_path: Path, opcode: bytes, length: int) -> None:
    """BINBYTES8 / BINUNICODE8 length fields far beyond the file: one line, and no
    allocation of the claimed size (run under an address-space limit below it)."""
    import resource
    import struct
    import subprocess
    import sys

    f = tmp_path / "gnd_big.pkl"
    f.write_bytes(b"\x80\x04" + opcode + struct.pack("<Q", length) + b"abc")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30));"
            "from lib.errors import UserError;"
            "from lib.groundtruth.revisited import load_restricted_pickle\n"
            "try:\n    load_restricted_pickle(sys.argv[1])\n"
            "except UserError as e:\n    print(e)")
    assert resource.RLIMIT_AS is not None
    out = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert "not a readable ground-truth pickle" in out.stdout and str(length) in out.stdout


def test_revisited_bad_index(tmp_path: Path) -> None:
    g = _gnd(False)
    g["gnd"][1]["easy"] = [9]
    (tmp_path / "g.pkl").write_bytes(pickle.dumps(g))
    with pytest.raises(UserError, match=r"query 1 \(bodleian_000007\): 'easy' index 9"):
        read_revisited(tmp_path / "g.pkl", tmp_path, "r")


def _trecvid_tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    frames = ["shot1_1/shot1_1_RKF", "shot1_1/shot1_1_NKF_2", "shot1_2/shot1_2_RKF",
              "shot2_5/shot2_5_RKF", "shot3_3/shot3_3_RKF"]
    imgs = tmp_path / "gt_imgs"
    for f in frames:
        (imgs / f).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6)).save(imgs / f"{f}.png")
    qdir = tmp_path / "queries"
    qdir.mkdir()
    for topic, k in (("9069", 1), ("9069", 2), ("9070", 1)):
        Image.new("RGB", (20, 10)).save(qdir / f"{topic}.{k}.src.png")
        m = np.zeros((10, 20), np.uint8)
        m[2:5, 3:9] = 255
        Image.fromarray(m).save(qdir / f"{topic}.{k}.mask.png")
    qrels = tmp_path / "ins.search.qrels.tv13"
    qrels.write_bytes((FIX / "trecvid" / "ins.search.qrels.tv13").read_bytes())
    return qrels, imgs, qdir


def test_trecvid_reader(tmp_path: Path) -> None:
    qrels, imgs, qdir = _trecvid_tree(tmp_path)
    rel = read_qrels(qrels)
    assert rel == {"9069": {"shot1_1", "shot2_5", "shot9_9"}, "9070": {"shot1_2"}}
    gt = read_trecvid(qrels, imgs, "tv")  # queries found in <qrels folder>/queries
    assert [q.name for q in gt.queries] == ["9069_1", "9069_2", "9070_1"]
    q = gt.queries[0]
    assert q.image == "9069.1.src" and q.mask == qdir / "9069.1.mask.png"
    assert q.bbox == (3.0, 2.0, 9.0, 5.0) and q.topic == "9069"
    assert gt.shots["shot1_1/shot1_1_NKF_2"] == "shot1_1"
    assert q.positives == {"shot1_1/shot1_1_RKF", "shot1_1/shot1_1_NKF_2",
                           "shot2_5/shot2_5_RKF"}
    assert gt.relevant_shots["9069_2"] == {"shot1_1", "shot2_5", "shot9_9"}
    assert shot_of("shotA/frame") == "shotA"  # fewer than two fields: the folder
    other = tmp_path / "elsewhere"
    qdir.rename(other)
    assert len(read_trecvid(qrels, imgs, "tv", path_queries=other).queries) == 3
    (other / "9070.1.mask.png").unlink()
    with pytest.raises(UserError, match="9070.1.mask.png not found"):
        read_trecvid(qrels, imgs, "tv", path_queries=other)
    qrels.write_text("9069 0 shot1_1\n")
    with pytest.raises(UserError, match="line 1: expected 'topic 0 shot rel'"):
        read_qrels(qrels)


def test_dispatch_through_settings(tmp_path: Path) -> None:
    _touch_images(tmp_path / "images", ["paris_defense_000605", "paris_eiffel_000266"])
    _touch_images(tmp_path / "flickr", ["d/1", "d/0"])
    s = tmp_path / "s.json"
    s.write_text(json.dumps({"dataset": "p", "gt_format": "paris", "path_images": "images",
                             "path_gt": str(FIX / "paris_gt"), "path_distractors": "flickr",
                             "path_output": "run"}))
    gt = load_ground_truth(load_settings(s))
    assert gt.db_ids == ["paris_defense_000605", "paris_eiffel_000266", "distractors/d/0",
                         "distractors/d/1"]


def _generic(tmp_path: Path, gnd: list) -> Path:
    f = tmp_path / "gnd.json"
    f.write_text(json.dumps({"imlist": ["a", "b", "c"], "qimlist": ["q0", "q1"][:len(gnd)],
                             "gnd": gnd}))
    return f


def test_generic_gnd_unknown_key_is_refused(tmp_path: Path) -> None:
    """A misspelt judgement key used to be ignored, leaving a query without positives (a
    silently wrong mAP); it is now an error naming the query and the key."""
    from lib.groundtruth.loader import read_generic_json

    f = _generic(tmp_path, [{"ok": [0]}, {"positives": [1], "junk": []}])
    with pytest.raises(UserError) as e:
        read_generic_json(f, tmp_path, "g")
    msg = str(e.value)
    assert msg.startswith(f"{f}: query 1 (q1): unknown key 'positives' in its gnd entry")
    assert "valid keys: ok, junk, bbx, easy, hard" in msg and "\n" not in msg
    f = _generic(tmp_path, [{"oks": [0]}])
    with pytest.raises(UserError, match="query 0 \\(q0\\): unknown key 'oks' in its gnd "
                                        "entry; did you mean 'ok'\\?"):
        read_generic_json(f, tmp_path, "g")
    f = _generic(tmp_path, [{"ok": [0], "easy": [1]}])
    with pytest.raises(UserError, match="mixes 'ok' with 'easy'/'hard'"):
        read_generic_json(f, tmp_path, "g")
    # every valid key together still loads
    f = _generic(tmp_path, [{"ok": [0], "junk": [2], "bbx": [0, 0, 4, 4]},
                            {"easy": [1], "hard": [], "junk": [0], "bbx": None}])
    gt = read_generic_json(f, tmp_path, "g")
    assert [q.positives for q in gt.queries] == [{"a"}, {"b"}]


def test_queries_without_positives_are_named_in_one_warning(tmp_path: Path, caplog) -> None:
    from lib.groundtruth.loader import read_generic_json, warn_without_positives

    f = _generic(tmp_path, [{"ok": [0]}, {"ok": [], "junk": [1]}])
    gt = read_generic_json(f, tmp_path, "g")
    with caplog.at_level("WARNING", logger="lib.groundtruth.loader"):
        assert warn_without_positives(gt, f) == ["q1"]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "1 of 2 queries have no positives ('q1')" in warnings[0].getMessage()
    caplog.clear()
    f = _generic(tmp_path, [{"ok": [0]}])
    with caplog.at_level("WARNING", logger="lib.groundtruth.loader"):
        assert warn_without_positives(read_generic_json(f, tmp_path, "g"), f) == []
    assert not caplog.records


OFFICIAL = Path("/work/shared/data/ground_truth")


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="the official ground-truth files are "
                    "not on this machine")
def test_official_ground_truth_files_still_load(tmp_path: Path) -> None:
    """The strict gnd keys accept the official revisited pickles (bbx, easy, hard,
    junk), and the Oxford and Paris files load as before."""
    for name in ("roxford5k", "rparis6k"):
        gt = read_revisited(OFFICIAL / "revisited", tmp_path, name)
        assert len(gt.queries) == 70 and all(q.positives for q in gt.queries)
    for reader, folder, prefix in ((read_oxford, "oxford5k", "oxc1_"),
                                   (read_paris, "paris6k", "")):
        gt_dir = OFFICIAL / folder
        ids = set()
        for f in gt_dir.glob("*_query.txt"):
            ids.add(f.read_text().split()[0].removeprefix(prefix))
        for f in gt_dir.glob("*_[gojk]*.txt"):
            ids.update(f.read_text().split())
        images = _touch_images(tmp_path / folder, sorted(ids))
        gt = reader(gt_dir, images, folder)
        assert len(gt.queries) == 55
