"""Inputs that used to end in a traceback, a hang or an unbounded read now end in one
``error:`` line and exit code 2, before anything is written (issue 19, items 7 and 10):
out-of-range or non-finite settings values, unreadable settings files, ground-truth files
that are not regular files, box coordinates that are not finite numbers, duplicate query
names, and ids that would leave their image folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib.errors import SettingsError, UserError
from lib.groundtruth import common
from lib.groundtruth.common import find_image
from lib.groundtruth.loader import image_path, load_ground_truth
from lib.settings import load_settings

REPO = Path(__file__).resolve().parent.parent


def run_a(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "bow_pipeline" / "A_feature_extraction.py"), *args],
        capture_output=True, text=True, timeout=timeout)


def one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def toy(tmp_path: Path) -> dict:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gt.json").write_text(json.dumps({"imlist": [], "qimlist": [], "gnd": []}))
    return {"dataset": "toy", "gt_format": "generic", "path_images": "imgs",
            "path_gt": "gt.json", "path_output": "out"}


def write(tmp_path: Path, s: dict, name: str = "s.json") -> Path:
    f = tmp_path / name
    f.write_text(json.dumps(s))
    return f


# --------------------------------------------------------------------------- settings ranges


@pytest.mark.parametrize("key,value,needle", [
    ("input_size", [0, 0], "between 32 and 2048, got 0"),
    ("input_size", [-336, -256], "between 32 and 2048, got -336"),
    ("input_size", [100000, 80000], "between 32 and 2048, got 100000"),
    ("new_dim", [0, 0], "between 1 and 256, got 0"),
    ("new_dim", [-4, -3], "between 1 and 256, got -4"),
    ("new_dim", [100000, 100000], "between 1 and 256, got 100000"),
    ("max_side", 0, "between 32 and 2048, got 0"),
    ("max_side", 10**9, "between 32 and 2048"),
    ("gem_p", 0, "between 0.1 and 100, got 0.0"),
    ("gem_p", -3, "between 0.1 and 100"),
    ("batch_size", 0, ">= 1, got 0"),
    ("ar_threshold", 5.0, "between 0 and 1"),
])
def test_out_of_range_values_are_one_line(tmp_path, toy, key, value, needle):
    toy[key] = value
    one_line(run_a(str(write(tmp_path, toy))), f"key '{key}'", needle, "s.json")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("key", ["gem_p", "asmk_alpha", "lr", "margin", "ar_threshold"])
def test_non_finite_floats_refused(tmp_path, toy, key, literal):
    text = json.dumps(toy)[:-1] + f', "{key}": {literal}}}'
    f = tmp_path / "s.json"
    f.write_text(text)
    with pytest.raises(SettingsError, match=f"key '{key}': expected a finite number"):
        load_settings(f)


def test_non_finite_override_is_one_line(tmp_path, toy):
    f = write(tmp_path, toy)
    one_line(run_a(str(f), "--set", "gem_p=NaN"), "key 'gem_p'", "finite")
    one_line(run_a(str(f), "--set", "asmk_tau=Infinity"), "key 'asmk_tau'", "finite")
    assert not (tmp_path / "out").exists()


def test_ranges_are_documented():
    from lib.settings import schema_markdown

    md = schema_markdown()
    assert "| `input_size` | list[int], between 32 and 2048 |" in md
    assert "| `gem_p` | float, between 0.1 and 100 |" in md


# --------------------------------------------------------------------------- settings files


def test_settings_path_is_a_folder(tmp_path):
    (tmp_path / "cfg").mkdir()
    one_line(run_a(str(tmp_path / "cfg")), "not a regular file")


def test_settings_file_not_utf8(tmp_path, toy):
    f = tmp_path / "s.json"
    f.write_bytes(json.dumps({**toy, "dataset": "caf\xe9"}, ensure_ascii=False).encode("latin-1"))
    one_line(run_a(str(f)), "s.json", "not UTF-8")
    assert not (tmp_path / "out").exists()


def test_settings_deeply_nested(tmp_path, toy):
    f = tmp_path / "s.json"
    depth = 200000
    f.write_text(json.dumps(toy)[:-1] + ', "layers": ' + "[" * depth + "]" * depth + "}")
    one_line(run_a(str(f)), "s.json", "nested too deeply")
    assert not (tmp_path / "out").exists()


def test_deeply_nested_override_is_a_plain_string(tmp_path, toy):
    f = write(tmp_path, toy)
    proc = run_a(str(f), "--set", "dataset=" + "[" * 20000 + "]" * 20000)
    # taken as the string it is: no traceback (the run then fails or not for other reasons)
    assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr


# --------------------------------------------------------------------------- ground-truth files


def test_path_gt_dev_zero_is_refused(tmp_path, toy):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    toy["path_gt"] = "/dev/zero"
    one_line(run_a(str(write(tmp_path, toy)), timeout=60), "/dev/zero", "not a regular file")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_path_gt_fifo_is_refused(tmp_path, toy):
    os.mkfifo(tmp_path / "gt.fifo")
    toy["path_gt"] = "gt.fifo"
    one_line(run_a(str(write(tmp_path, toy)), timeout=60), "gt.fifo", "not a regular file")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_gt_files_fifo_in_folder_is_refused(tmp_path):
    (tmp_path / "imgs").mkdir()
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "tower_1_query.txt").write_text("a 0 0 5 5\n")
    os.mkfifo(gt / "tower_1_good.txt")
    # in a subprocess: a reader that opens the FIFO blocks forever
    code = ("import sys; from lib.errors import UserError; "
            "from lib.groundtruth.loader import load_ground_truth as g\n"
            "try:\n"
            f"    g(dict(gt_format='oxford', path_gt={str(gt)!r}, "
            f"path_images={str(tmp_path / 'imgs')!r}, dataset='toy', path_distractors=None))\n"
            "except UserError as e:\n"
            "    print(e); sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "tower_1_good.txt: ground-truth file is not a regular" in proc.stdout


def test_oversized_gt_file_is_refused(tmp_path, monkeypatch):
    f = tmp_path / "gt.json"
    f.write_text(json.dumps({"imlist": [], "qimlist": [], "gnd": []}))
    monkeypatch.setattr(common, "MAX_GT_BYTES", 8)
    s = {"gt_format": "generic", "path_gt": f, "path_images": tmp_path, "dataset": "toy",
         "path_distractors": None}
    with pytest.raises(UserError, match="larger than"):
        load_ground_truth(s)


def test_gt_not_utf8_and_deeply_nested(tmp_path):
    f = tmp_path / "gt.json"
    s = {"gt_format": "generic", "path_gt": f, "path_images": tmp_path, "dataset": "toy",
         "path_distractors": None}
    f.write_bytes(b'{"imlist": ["caf\xe9"], "qimlist": [], "gnd": []}')
    with pytest.raises(UserError, match="not UTF-8"):
        load_ground_truth(s)
    f.write_text('{"imlist": ' + "[" * 200000 + "]" * 200000 + "}")
    with pytest.raises(UserError, match="nested too deeply"):
        load_ground_truth(s)


# --------------------------------------------------------------------------- boxes and names


def generic(tmp_path: Path, data: dict) -> dict:
    f = tmp_path / "gt.json"
    f.write_text(json.dumps(data, allow_nan=True))
    (tmp_path / "imgs").mkdir(exist_ok=True)
    return {"gt_format": "generic", "path_gt": f, "path_images": tmp_path / "imgs",
            "path_queries": None, "dataset": "toy", "path_distractors": None}


@pytest.mark.parametrize("bbx", [
    ["0", "0", "10", "10"], [False, False, True, True], [0, 0, True, 10],
    [0, 0, float("inf"), 10], [0, 0, 10, float("nan")], [0, 0, 10], "0 0 10 10",
    {"x1": 0}, [0, 0, 10, [10]],
])
def test_box_coordinates_must_be_finite_numbers(tmp_path, bbx):
    s = generic(tmp_path, {"imlist": ["a"], "qimlist": ["q"],
                           "gnd": [{"bbx": bbx, "ok": [0]}]})
    with pytest.raises(UserError, match=r"query 0 \(q\): bbx must be \[x1, y1, x2, y2\] of "
                                        "finite numbers"):
        load_ground_truth(s)


def test_good_box_still_read(tmp_path):
    s = generic(tmp_path, {"imlist": ["a"], "qimlist": ["q"],
                           "gnd": [{"bbx": [0, 1.5, 10, 20], "ok": [0]}]})
    assert load_ground_truth(s).queries[0].bbox == (0.0, 1.5, 10.0, 20.0)


def test_duplicate_query_names(tmp_path):
    s = generic(tmp_path, {"imlist": ["a"], "qimlist": ["q", "q"],
                           "gnd": [{"ok": [0]}, {"ok": [0]}]})
    with pytest.raises(UserError, match="duplicate query name 'q'"):
        load_ground_truth(s)


def test_duplicate_query_names_one_line(tmp_path, toy):
    (tmp_path / "gt.json").write_text(json.dumps(
        {"imlist": [], "qimlist": ["q", "q"], "gnd": [{}, {}]}))
    one_line(run_a(str(write(tmp_path, toy))), "duplicate query name 'q'")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- ids leaving roots


@pytest.mark.parametrize("bad", ["../queries/q_0", "/etc/passwd", "a/../../b", "./a", "a//b",
                                 "", "a\0b"])
def test_database_id_outside_root_refused(tmp_path, bad):
    s = generic(tmp_path, {"imlist": ["ok", bad], "qimlist": [], "gnd": []})
    with pytest.raises(UserError, match="database image id") as e:
        load_ground_truth(s)
    assert repr(bad) in str(e.value)


@pytest.mark.parametrize("bad", ["../q_0", "/etc/passwd", "sub/../../q"])
def test_query_name_outside_root_refused(tmp_path, bad):
    s = generic(tmp_path, {"imlist": ["a"], "qimlist": [bad], "gnd": [{"ok": [0]}]})
    with pytest.raises(UserError, match="query name") as e:
        load_ground_truth(s)
    assert repr(bad) in str(e.value)


def _oxford_toy(tmp_path: Path, query_line: str, good: str = "") -> dict:
    """An Oxford-layout ground truth of one query (its lines given) and an empty image
    folder, as the settings mapping the reader takes."""
    gt = tmp_path / "gt"
    gt.mkdir()
    (tmp_path / "imgs").mkdir()
    (gt / "tower_1_query.txt").write_text(query_line)
    (gt / "tower_1_good.txt").write_text(good)
    (gt / "tower_1_ok.txt").write_text("")
    (gt / "tower_1_junk.txt").write_text("")
    return {"gt_format": "oxford", "path_gt": gt, "path_images": tmp_path / "imgs",
            "dataset": "toy", "path_distractors": None}


def test_judged_id_outside_root_refused(tmp_path):
    s = _oxford_toy(tmp_path, "a 0 0 5 5\n", good="../../etc/passwd\n")
    with pytest.raises(UserError, match="'../../etc/passwd'"):
        load_ground_truth(s)


def test_query_image_outside_root_refused_oxford(tmp_path):
    s = _oxford_toy(tmp_path, "oxc1_../../secret 0 0 5 5\n")
    with pytest.raises(UserError, match="query image id '../../secret'"):
        load_ground_truth(s)


def test_find_image_stays_inside_root(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (root / "a.jpg").write_bytes(b"x")
    assert find_image(root, "a") == root / "a.jpg"
    for bad in ("../secret", "/etc/passwd", str(tmp_path / "secret")):
        with pytest.raises(UserError, match="image id"):
            find_image(root, bad)
    s = {"path_images": root, "path_queries": None, "path_distractors": root}
    with pytest.raises(UserError, match="image id"):
        image_path(s, "distractors/../secret")
    with pytest.raises(UserError, match="image id"):
        image_path(s, "../secret", query=True)


def test_id_outside_root_is_one_line(tmp_path, toy):
    (tmp_path / "queries").mkdir()
    (tmp_path / "gt.json").write_text(json.dumps(
        {"imlist": ["../queries/q_0"], "qimlist": [], "gnd": []}))
    one_line(run_a(str(write(tmp_path, toy))), "'../queries/q_0'")
    assert not (tmp_path / "out").exists()
