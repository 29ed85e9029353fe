"""The output-folder lock (lib/artefacts.py ``output_lock``): exclusive under a race of
several processes, held by ``run_all`` for its whole duration and taken over by the steps
it starts, and taken on shared ``path_features`` / ``path_models`` folders too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_pipeline import install_fake_steps

from lib import cli, pipeline
from lib.artefacts import LOCK_ENV, inheritable_locks, output_lock

REPO = Path(__file__).resolve().parent.parent

# One racer: until the deadline, try to take the lock; while holding it, create an
# O_EXCL marker (fails if anyone else holds the lock too), keep it a moment, remove it.
# Prints "<rounds held> <overlaps seen>".
_RACER = r'''
import os, sys, time
from lib.artefacts import output_lock
from lib.errors import LockedError
folder, start, stop = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
marker = os.path.join(folder, "holder")
while time.time() < start:
    time.sleep(0.001)
held = overlaps = 0
while time.time() < stop:
    try:
        with output_lock(folder, "S"):
            held += 1
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                overlaps += 1
                continue
            os.close(fd)
            time.sleep(0.0005)
            os.unlink(marker)
    except LockedError:
        pass
print(held, overlaps, flush=True)
'''


def test_lock_is_exclusive_under_a_race_of_processes(tmp_path):
    """4 processes race for ~3 s; no two ever hold the lock at once (the old
    create-then-write-the-pid lock let two in during about a third of the rounds)."""
    n, start = 4, time.time() + 1.5
    env = {k: v for k, v in os.environ.items() if k != LOCK_ENV}
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(start),
                                str(start + 3.0)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
              for _ in range(n)]
    results = []
    for p in racers:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-3000:]
        results.append(tuple(int(x) for x in out.split()))
    held = sum(h for h, _ in results)
    overlaps = sum(o for _, o in results)
    assert overlaps == 0, f"two processes held the lock at once {overlaps} times: {results}"
    assert held >= 20, f"too few rounds to mean anything: {results}"
    assert not (tmp_path / ".lock").exists()


_HOLD_AND_SPAWN = r'''
import json, os, subprocess, sys
from lib.artefacts import LOCK_ENV, inheritable_locks, output_lock
folder, child_code, forge = sys.argv[1], sys.argv[2], sys.argv[3] == "forge"
with output_lock(folder, "run_all"):
    held, fds = inheritable_locks()
    if forge:  # names the lock but hands over no descriptor
        held, fds = json.dumps({k: 99 for k in json.loads(held)}), ()
    r = subprocess.run([sys.executable, "-c", child_code, folder], pass_fds=fds,
                       env={**os.environ, LOCK_ENV: held}, capture_output=True, text=True)
    print(r.stdout.strip(), flush=True)
'''

_CHILD = r'''
import sys
from lib.artefacts import output_lock
from lib.errors import LockedError
try:
    with output_lock(sys.argv[1], "C"):
        print("child in")
except LockedError as e:
    print(e)
'''


def test_child_of_the_holder_is_let_in_others_are_not(tmp_path):
    """A process started with the holder's descriptor (run_all's steps) takes the lock
    over; naming the lock in the environment without the descriptor is not enough."""
    env = {k: v for k, v in os.environ.items() if k != LOCK_ENV}
    got = subprocess.run([sys.executable, "-c", _HOLD_AND_SPAWN, str(tmp_path), _CHILD,
                          "pass"], capture_output=True, text=True, env=env, cwd=REPO)
    assert got.stdout.strip() == "child in", got.stderr
    got = subprocess.run([sys.executable, "-c", _HOLD_AND_SPAWN, str(tmp_path), _CHILD,
                          "forge"], capture_output=True, text=True, env=env, cwd=REPO)
    assert "in use by another run (pid" in got.stdout and "step run_all)" in got.stdout, \
        got.stdout + got.stderr
    assert not (tmp_path / ".lock").exists()


def test_same_process_reenters_and_inheritable_locks_lists_held(tmp_path):
    with output_lock(tmp_path, "A"):
        held, fds = inheritable_locks()
        assert json.loads(held) == {str((tmp_path / ".lock").resolve()): fds[0]}
        with output_lock(tmp_path, "B"):  # re-entry does not release at its end
            pass
        assert (tmp_path / ".lock").read_text().split() == [str(os.getpid()), "A"]
    assert inheritable_locks() == ("{}", ())
    assert not (tmp_path / ".lock").exists()


class _FakeSettings:
    """What run_all reads of the settings; ``source`` is read by the fake steps."""

    def __init__(self, root: Path):
        self.path_output = root / "run"
        self.path_features = root / "shared" / "features"
        self.path_models = root / "shared" / "models"
        self.dataset = "fake"
        self.source = root / "fake.json"
        self.source.write_text(json.dumps({
            "out": str(self.path_output), "log": str(root / "log.txt"),
            "shared": [str(self.path_features), str(self.path_models)]}))

    def step_hash(self, key: str) -> str:
        return "h"

    def __getitem__(self, key: str):
        return getattr(self, key)


# A fake step: takes the locks a real step takes (inherited from run_all), then, after
# releasing them, asks an unrelated process to take each: run_all must still hold them.
_FAKE_STEP = r'''
import json, os, subprocess, sys
from lib.artefacts import LOCK_ENV, output_lock
cfg = json.load(open(sys.argv[1]))
key = os.path.basename(sys.argv[0])[0]
with output_lock(cfg["out"], key), output_lock(cfg["shared"][0], key):
    with open(cfg["log"], "a") as f:
        f.write(f"{key} in\n")
env = {k: v for k, v in os.environ.items() if k != LOCK_ENV}
for folder in [cfg["out"], *cfg["shared"]]:
    r = subprocess.run([sys.executable, "-c", sys.argv[2], folder], env=env,
                       capture_output=True, text=True)
    with open(cfg["log"], "a") as f:
        f.write(f"{key} outsider: {r.stdout.strip()}\n")
'''


def test_run_all_holds_the_locks_between_its_steps(tmp_path, monkeypatch):
    install_fake_steps(tmp_path / "scripts", monkeypatch, _FAKE_STEP)
    s = _FakeSettings(tmp_path)
    pipeline.run_all(s, [_CHILD])
    log = (tmp_path / "log.txt").read_text().splitlines()
    me = f"in use by another run (pid {os.getpid()}, step run_all)"
    for key in "ABCDE":
        assert f"{key} in" in log
        outsiders = [ln for ln in log if ln.startswith(f"{key} outsider:")]
        assert len(outsiders) == 3 and all(me in ln for ln in outsiders), log
    for folder in (s.path_output, s.path_features, s.path_models):
        assert not (folder / ".lock").exists()
        with output_lock(folder, "after"):
            pass


def test_shared_folders_only_outside_the_output(tmp_path):
    s = _FakeSettings(tmp_path)
    assert pipeline.shared_folders(s, "AB") == [s.path_features.resolve(),
                                                s.path_models.resolve()]
    assert pipeline.shared_folders(s, "CDE") == []
    s.path_features = s.path_output / "features"
    assert pipeline.shared_folders(s, "A") == []


def test_a_step_alone_locks_the_shared_folder_it_writes(tmp_path, monkeypatch, capsys):
    """Two runs with different output folders but one shared path_features: the second
    step A is refused (exit 3) before it extracts anything."""
    s = _FakeSettings(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time\nfrom lib.artefacts import output_lock\n"
         "with output_lock(sys.argv[1], 'A'):\n print('held', flush=True); time.sleep(30)",
         str(s.path_features)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    called = []
    monkeypatch.setattr(cli, "load_from_args", lambda args, resolve_auto=False: s)
    monkeypatch.delenv(LOCK_ENV, raising=False)
    args = cli.make_parser("A", "").parse_args([str(s.source), "-q"])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            cli.run_step(args, "A", lambda settings: called.append(1))
        assert e.value.code == 3
        err = capsys.readouterr().err
        assert f"{s.path_features.resolve()}: in use by another run (pid {holder.pid}, " \
               "step A)" in err, err
        assert not called
        with pytest.raises(SystemExit) as e:  # C does not write path_features: not locked
            cli.run_step(args, "C", lambda settings: pipeline.StepResult("C", ""))
        assert e.value.code == 0
    finally:
        holder.kill()
        holder.wait()


def test_real_run_all_with_shared_folders_refuses_a_second_run(tmp_path):
    """The shipped scripts: run_all with path_features / path_models outside its output
    folder (as the 105k settings) holds their locks; its steps take them over and finish;
    a second run_all with another output folder but the same shared folders exits 3."""
    from helpers_pipeline import env, make_dataset

    settings = make_dataset(tmp_path, path_features="shared/features",
                            path_models="shared/models")
    other = json.loads(settings.read_text())
    other["path_output"] = "run2"
    (tmp_path / "other.json").write_text(json.dumps(other))
    script = str(REPO / "bow_pipeline" / "run_all.py")
    e = {k: v for k, v in env().items() if k != LOCK_ENV}
    first = subprocess.Popen([sys.executable, script, str(settings), "-q"], env=e, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "shared" / "models" / ".lock").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run([sys.executable, script, str(tmp_path / "other.json")],
                                env=e, cwd=REPO, capture_output=True, text=True, timeout=120)
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 3, second.stderr[-3000:]
    assert f"in use by another run (pid {first.pid}, step run_all)" in second.stderr
    assert "Traceback" not in second.stderr
    assert not list(tmp_path.rglob(".lock"))
    assert (tmp_path / "run" / "bow" / "map.txt").exists()
