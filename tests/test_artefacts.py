"""Atomic writes, metadata checks and the output-folder lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lib.artefacts import (
    atomic_path,
    canonical_hash,
    check_fields,
    load_npy,
    output_lock,
    save_npy_atomic,
    write_json_atomic,
)
from lib.errors import ArtefactMismatchError, LockedError, UserError


def test_atomic_file_untouched_on_failure(tmp_path):
    target = tmp_path / "x.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_folder_replace(tmp_path):
    target = tmp_path / "index"
    for v in ("one", "two"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "f.txt").write_text(v)
    assert (target / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_npy_roundtrip_and_truncated(tmp_path):
    p = tmp_path / "a.npy"
    save_npy_atomic(p, np.arange(1000, dtype=np.float32))
    assert load_npy(p, mmap=True)[999] == 999
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(UserError, match="a.npy: unreadable or truncated"):
        load_npy(p)


def test_check_fields_names_the_field():
    check_fields({"network": "vgg16", "layers": ["conv5_1"]},
                 {"network": "vgg16", "layers": ("conv5_1",)}, ["network", "layers"], "x")
    with pytest.raises(ArtefactMismatchError, match="codebook.json: field 'network' is "
                       "'resnet50' but the settings ask for 'vgg16'; rerun B"):
        check_fields({"network": "vgg16"}, {"network": "resnet50"}, ["network"],
                     "codebook.json", "rerun B")
    with pytest.raises(ArtefactMismatchError, match="'<missing>'"):
        check_fields({"k": 1}, {}, ["k"], "m.json")


def test_canonical_hash_ignores_key_order():
    assert canonical_hash({"a": 1, "b": [1, 2]}) == canonical_hash({"b": [1, 2], "a": 1})
    assert canonical_hash({"a": 1}) != canonical_hash({"a": 2})


def test_lock_refuses_second_holder_and_takes_over_stale(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time;"
         "from lib.artefacts import output_lock\n"
         "with output_lock(sys.argv[2], 'A'):\n print('held', flush=True); time.sleep(30)",
         str(Path(__file__).resolve().parent.parent), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {child.pid}, step A"), \
                output_lock(tmp_path, "C"):
            pass
    finally:
        child.kill()
        child.wait()
    # the killed holder left its lock behind: a new run takes it over
    assert (tmp_path / ".lock").exists()
    with output_lock(tmp_path, "C"):
        assert (tmp_path / ".lock").read_text().startswith(str(os.getpid()))
    assert not (tmp_path / ".lock").exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_write_removes_what_a_dead_writer_left(tmp_path):
    """A writer killed inside atomic_path leaves ``.<name>.tmp-PID`` (and, for folders,
    ``.<name>.old-PID``); the next atomic write of that name removes those of dead pids,
    never a live writer's, nor another name's."""
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = [f".index.tmp-{dead}", f".index.old-{dead}"]
        kept = [f".index.tmp-{live.pid}", f".index.old-{live.pid}", f".other.tmp-{dead}",
                f".index2.tmp-{dead}"]
        for name in left + kept:
            (tmp_path / name).mkdir()
            (tmp_path / name / "inverted.npy").write_bytes(b"x" * 100)
        (tmp_path / f".x.json.tmp-{dead}").write_text("half")
        with atomic_path(tmp_path / "index") as tmp:
            tmp.mkdir()
            (tmp / "f.txt").write_text("one")
        write_json_atomic(tmp_path / "x.json", {"a": 1})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "index", "x.json"])
    finally:
        live.kill()
        live.wait()
    # once the live writer is gone, the next write cleans its leftovers too
    with atomic_path(tmp_path / "index") as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".other.tmp-{dead}", f".index2.tmp-{dead}", "index", "x.json"])
