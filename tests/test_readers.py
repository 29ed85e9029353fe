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
