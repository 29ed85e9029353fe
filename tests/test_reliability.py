"""Interrupted runs: a step killed (SIGKILL) or stopped with Ctrl-C (SIGINT) at a chosen
write, then rerun, must end with exactly what an uninterrupted run writes — LMDB stores
compared key by key, models, inverted file, ranking lists, scores, map.txt — and a second
run on the same output folder must refuse while the first holds it.

How the points are chosen: the step's library entry point runs, as its script runs it
(inside lib.cli.run_main), in a child process under a small wrapper
(``helpers_pipeline.FAULT_RUNNER``) that numbers every write (each LMDB transaction, each
atomic file/folder write before, inside = temporary complete but not renamed, and after)
and signals its own process at one of them. The default suite kills step A once (while a
second run is refused by the lock) and interrupts step C once; the ``slow`` loop kills A
and C at >= 10 seeded random points out of the full list of writes of a dry run.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from lib.errors import LockedError
from tests.helpers_pipeline import (
    REPO,
    assert_one_error,
    dump_lmdb,
    fault_cmd,
    litter,
    make_dataset,
    refusal,
    run_outputs,
    run_pipeline,
    run_with_fault,
)

N_SLOW_POINTS = 12  # seeded random kill points of the slow loop (across A and C)
C_OUTPUTS = ("assignments.lmdb", "index", "bow", "query_words.lmdb")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, dict]:
    """An uninterrupted A -> E run: (root, settings, its outputs by content)."""
    root = tmp_path_factory.mktemp("ref")
    s = make_dataset(root)
    run_pipeline(s)
    return root, s, run_outputs(root / "run", root)


def inputs_copy(ref_root: Path, dst: Path, with_run: bool = False) -> Path:
    """The reference's inputs (and, with ``with_run``, its run folder) in a new root."""
    shutil.copytree(ref_root, dst, ignore=None if with_run else shutil.ignore_patterns("run"))
    return dst / "settings.json"


def fresh_for_c(ref_root: Path, dst: Path) -> Path:
    """A copy whose run folder holds A's store and B's models only."""
    s = inputs_copy(ref_root, dst, with_run=True)
    for name in C_OUTPUTS:
        shutil.rmtree(dst / "run" / name, ignore_errors=True)
    return s


def assert_partial_is_prefix(run: Path, ref_run: Path) -> None:
    """Right after a kill, every stored record is already the final one: a later step can
    trust whatever the stores hold (nothing half-written)."""
    for p in run.rglob("data.mdb"):
        rel = p.parent.relative_to(run)
        recs, _ = dump_lmdb(p.parent)
        ref, _ = dump_lmdb(ref_run / rel)
        bad = [k for k, v in recs.items() if ref.get(k) != v]
        assert not bad, f"{rel}: records differ from the uninterrupted run: {bad[:3]}"
    idx = run / "index"
    if idx.exists():  # an inverted file is there whole or not at all
        for f in (ref_run / "index").iterdir():
            if f.suffix == ".npy" or f.name == "image_ids.txt":
                assert (idx / f.name).read_bytes() == f.read_bytes(), f.name


def resume_and_compare(root: Path, s: Path, steps: str, ref: dict, ref_root: Path) -> None:
    """Rerun the interrupted step and the later ones; compare with the reference."""
    run_pipeline(s, steps)
    got = run_outputs(root / "run", [root, ref_root])
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k] == ref[k], f"{k} differs from the uninterrupted run"


def test_kill_a_while_a_second_run_is_refused(reference, tmp_path):
    """Step A stopped after its 3rd LMDB transaction: a second run on the same output
    folder exits 3 naming the holder's pid and writes nothing; then the first is killed
    (SIGKILL), and a rerun resumes to exactly the uninterrupted store and results."""
    ref_root, _, ref = reference
    s = inputs_copy(ref_root, tmp_path / "r")
    cmd, env = fault_cmd("A", s, at="features.txn:after@3", sig="STOP")
    first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "r" / "run" / ".lock"
        deadline = time.monotonic() + 240
        while not _stopped(first.pid):
            assert first.poll() is None, "step A ended before reaching the stop point"
            assert time.monotonic() < deadline, "step A never reached the stop point"
            time.sleep(0.2)
        assert lock.read_text().split()[0] == str(first.pid)
        store = next((tmp_path / "r" / "run" / "features").glob("*.lmdb"))
        before = dump_lmdb(store)
        err = refusal("A", s)
        assert isinstance(err, LockedError)
        assert_one_error(err, f"pid {first.pid}", "in use by another run", exit_code=3)
        assert dump_lmdb(store) == before  # the refused run wrote nothing
        assert lock.read_text().split()[0] == str(first.pid)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert_partial_is_prefix(tmp_path / "r" / "run", ref_root / "run")
    resume_and_compare(tmp_path / "r", s, "ABCDE", ref, ref_root)


def _stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def test_ctrl_c_in_c_is_clean_and_resumable(reference, tmp_path):
    """SIGINT while C writes its inverted file (temporary complete, not yet renamed): one
    clear line, exit code 130, the lock released, no index; the rerun ends identical."""
    ref_root, _, ref = reference
    s = fresh_for_c(ref_root, tmp_path / "r")
    p = run_with_fault("C", s, at="atomic index:inside@1", sig="INT")
    assert p.returncode == 130, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    msg = [ln for ln in p.stderr.splitlines() if ln.startswith("interrupted:")]
    assert len(msg) == 1 and "step C" in msg[0] and "rerun the same command" in msg[0]
    run = tmp_path / "r" / "run"
    assert not (run / ".lock").exists()
    assert not (run / "index").exists()
    assert not [x for x in litter(run) if "index" in x], litter(run)
    assert_partial_is_prefix(run, ref_root / "run")
    resume_and_compare(tmp_path / "r", s, "CDE", ref, ref_root)


@pytest.mark.slow
def test_sigkill_at_seeded_random_points(reference, tmp_path):
    """>= 10 seeded random kill points across every write of A and C (from a dry run's
    event list); each killed run is rerun and must end identical to the reference."""
    ref_root, _, ref = reference
    events: dict[str, list[str]] = {}
    for step in "AC":
        root = tmp_path / f"dry{step}"
        s = (inputs_copy(ref_root, root) if step == "A" else fresh_for_c(ref_root, root))
        log = tmp_path / f"{step}.log"
        p = run_with_fault(step, s, log=log)
        assert p.returncode == 0, p.stderr[-3000:]
        events[step] = [ln.split("\t")[1] for ln in log.read_text().splitlines()]
    rng = np.random.default_rng(8)
    points = [("A", int(i)) for i in rng.choice(len(events["A"]), N_SLOW_POINTS // 2,
                                                replace=False)]
    points += [("C", int(i)) for i in rng.choice(len(events["C"]),
                                                 min(N_SLOW_POINTS // 2, len(events["C"])),
                                                 replace=False)]
    assert len(points) >= 10
    for n, (step, at) in enumerate(points):
        root = tmp_path / f"k{n}"
        s = inputs_copy(ref_root, root) if step == "A" else fresh_for_c(ref_root, root)
        p = run_with_fault(step, s, at=at)
        where = f"{step} killed at event {at} ({events[step][at]})"
        assert p.returncode == -signal.SIGKILL, f"{where}: exit {p.returncode}"
        assert_partial_is_prefix(root / "run", ref_root / "run")
        try:
            resume_and_compare(root, s, "ABCDE" if step == "A" else "CDE", ref, ref_root)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None
