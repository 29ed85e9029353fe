"""The machine's storage failing under a step: a full disk, a read-only folder, missing
permissions. Each is one line naming the path, exit code 2, and the work finished
before it is kept, so the same command resumes once the disk has room
(lib/errors.py ``storage_error``, ``store_write_error``; lib/cli.py ``run_main``;
lib/features/feature_store.py ``write_growing``).

The first tests inject the errors; the last ones use a real small tmpfs and a read-only
bind mount, and skip where mounting is not allowed (it needs root)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import lmdb
import pytest
from helpers_pipeline import REPO, env, make_dataset

from lib import errors
from lib.cli import run_main
from lib.errors import UserError, storage_error
from lib.features.feature_store import write_growing


def _exit_of(body) -> int:
    with pytest.raises(SystemExit) as e:
        run_main(body, "A")
    return int(e.value.code)


@pytest.mark.parametrize("code, needle", [
    (errno.ENOSPC, "no space left on the disk"),
    (errno.EROFS, "the file system is read-only"),
    (errno.EACCES, "permission denied"),
])
def test_storage_oserror_is_one_line_and_exit_2(code, needle, tmp_path, capsys):
    path = str(tmp_path / "run" / ".lock")

    def body() -> int:
        raise OSError(code, os.strerror(code), path)

    assert _exit_of(body) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and needle in err


def test_other_oserrors_keep_their_trace(tmp_path):
    """A bug (here ENOTDIR from our own code) must not be disguised as the user's disk."""
    def body() -> int:
        raise OSError(errno.ENOTDIR, "Not a directory", str(tmp_path))

    assert storage_error(OSError(errno.ENOTDIR, "x", "y")) is None
    with pytest.raises(OSError):
        run_main(body, "A")


def test_failed_lmdb_commit_names_the_store_and_says_disk_full(tmp_path, monkeypatch):
    store = tmp_path / "s.lmdb"
    env_ = lmdb.open(str(store), map_size=1 << 20)

    def fill(txn) -> None:
        txn.put(b"a", b"1")
        raise lmdb.Error("mdb_txn_commit: Input/output error")

    monkeypatch.setattr(errors, "_free_bytes", lambda p: 4096)
    with pytest.raises(UserError) as e:
        write_growing(env_, fill, "feature store")
    msg = str(e.value)
    assert "\n" not in msg and str(store) in msg and "the disk is full" in msg
    monkeypatch.setattr(errors, "_free_bytes", lambda p: 10 << 30)
    with pytest.raises(UserError) as e:
        write_growing(env_, fill, "feature store")
    assert "Input/output error" in str(e.value) and "disk is full" not in str(e.value)
    with env_.begin() as txn:  # the failed transaction left nothing behind
        assert txn.get(b"a") is None
    env_.close()


# ----------------------------------------------------------------- real mounts (root)


def _mount(*args: str) -> bool:
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def tiny_fs(tmp_path):
    """A tmpfs of 1 MB: room for the store's first pages, not for all its records."""
    where = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    yield where
    subprocess.run(["umount", str(where)], capture_output=True)


def _step_a(settings: Path, *overrides: str) -> subprocess.CompletedProcess:
    sets = [a for o in overrides for a in ("--set", o)]
    return subprocess.run([sys.executable, "bow_pipeline/A_feature_extraction.py",
                           str(settings), "-q", *sets], capture_output=True, text=True,
                          env=env(), cwd=REPO, timeout=300)


def _records(store: Path) -> dict[bytes, bytes]:
    with lmdb.open(str(store), readonly=True, lock=False, subdir=True) as e, \
            e.begin() as txn:
        return {k: bytes(v) for k, v in txn.cursor() if not k.startswith(b"__")}


def test_full_disk_in_step_a_is_one_line_then_resumes_identically(tmp_path, tiny_fs):
    settings = make_dataset(tmp_path / "d", db_sizes=[(f"img_{i:02d}", 64, 48)
                                                     for i in range(24)],
                            input_size=[256, 192], batch_size=2, n_centers=4)
    full = _step_a(settings, f"path_output={tiny_fs / 'run'}")
    assert full.returncode == 2, full.stderr
    line = full.stderr.strip()
    assert line.count("\n") == 0 and "the disk is full" in line, full.stderr
    store = next((tiny_fs / "run" / "features").glob("*.lmdb"))
    assert str(store) in line
    kept = _records(store)  # the store still opens; whatever was committed is whole
    assert len(kept) < 24

    assert subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_fs)]).returncode == 0
    again = _step_a(settings, f"path_output={tiny_fs / 'run'}")
    assert again.returncode == 0, again.stderr
    reference = _step_a(settings, f"path_output={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr
    done = _records(store)
    assert len(done) == 24 and all(done[k] == v for k, v in kept.items())
    assert done == _records(next((tmp_path / "ref" / "features").glob("*.lmdb")))


def test_read_only_output_folder_is_one_line(tmp_path):
    settings = make_dataset(tmp_path / "d", n_centers=4)
    ro = tmp_path / "ro"
    ro.mkdir()
    if not (_mount("--bind", str(ro), str(ro))
            and _mount("-o", "remount,bind,ro", str(ro))):
        subprocess.run(["umount", str(ro)], capture_output=True)
        pytest.skip("cannot make a read-only bind mount here (needs root and mount rights)")
    try:
        res = _step_a(settings, f"path_output={ro / 'run'}")
        assert res.returncode == 2
        line = res.stderr.strip()
        assert line.count("\n") == 0 and "read-only" in line and str(ro) in line, res.stderr
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
