"""``run_all`` starts every step on one snapshot of the settings it validated
(lib/pipeline.py ``write_snapshot``), so an edit to the settings file while it runs
reaches none of its steps, and ``run_state.json`` records the hashes of the settings the
steps used: a later ``run_all`` with the file restored is up to date, with it changed
reruns. The steps here are fake scripts (quick) that load their settings exactly as the
real ones do (``lib.cli.load_from_args``) and write the outputs ``run_all`` checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_pipeline import install_fake_steps, make_dataset

from lib import cli, pipeline
from lib.errors import SettingsError
from lib.settings import load_settings

# A fake step: loads its settings as a step script does, logs what it got, edits the
# user's settings file if asked to (FAKE_EDIT = "<step><pca_dim>"), writes its outputs
# (E: a results.json whose mAP tells which pca_dim it ran with).
_FAKE_STEP = r'''
import json, os, sys
from pathlib import Path
from lib.cli import load_from_args, make_parser
from lib.pipeline import STEPS
key = os.path.basename(sys.argv[0])[0]
args = make_parser(key, "").parse_args(sys.argv[1:])
s = load_from_args(args)
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([key, s["pca_dim"], s["seed"], s.step_hash(key), str(s.source)])
            + "\n")
edit = os.environ.get("FAKE_EDIT", "")
if edit[:1] == key:  # the user edits the settings file while this step runs
    p = Path(args.settings)
    d = json.loads(p.read_text())
    d["pca_dim"] = int(edit[1:])
    p.write_text(json.dumps(d))
step = next(x for x in STEPS if x.key == key)
for out in step.outputs(s):
    if key == "A":
        out.mkdir(parents=True, exist_ok=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"map": s["pca_dim"] / 100, "n_queries": 2}))
'''


@pytest.fixture
def fake_steps(tmp_path, monkeypatch):
    install_fake_steps(tmp_path / "scripts", monkeypatch, _FAKE_STEP)
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    return log


def _run_all(path: Path, *argv: str):
    """run_all as ``bow_pipeline/run_all.py`` calls it."""
    args = cli.make_parser("run_all.py", "").parse_args([str(path), "-q", *argv])
    return pipeline.run_all(cli.load_from_args(args), cli.step_arguments(args))


def _read_log(log: Path) -> list[list]:
    got = [json.loads(line) for line in log.read_text().splitlines()]
    log.unlink()
    return got


def test_an_edit_during_run_all_reaches_no_step(tmp_path, fake_steps, monkeypatch):
    path = make_dataset(tmp_path / "d")
    original = path.read_text()
    used = load_settings(path, overrides=["seed=3"])
    assert used["pca_dim"] == 8

    monkeypatch.setenv("FAKE_EDIT", "A16")  # pca_dim 16 written during step A
    res = _run_all(path, "--set", "seed=3")
    assert json.loads(path.read_text())["pca_dim"] == 16
    got = _read_log(fake_steps)
    assert [g[0] for g in got] == list("ABCDE")
    # every step: the settings run_all started with, --set applied once, errors naming
    # the user's file
    assert all(g[1:3] == [8, 3] and g[4] == str(path.resolve()) for g in got), got
    assert {g[0]: g[3] for g in got} == {k: used.step_hash(k) for k in "ABCDE"}
    state = json.loads((used.path_output / "run_state.json").read_text())
    assert {k: v["hash"] for k, v in state.items()} == {k: used.step_hash(k)
                                                       for k in "ABCDE"}
    assert res.counts["results"]["map"] == pytest.approx(0.08)
    snap = json.loads((used.path_output / pipeline.SNAPSHOT_NAME).read_text())
    assert snap["pca_dim"] == 8 and snap["seed"] == 3 and "extends" not in snap
    assert Path(snap["path_images"]).is_absolute()
    monkeypatch.delenv("FAKE_EDIT")

    # the file restored: what the steps used, up to date, the right mAP
    path.write_text(original)
    res = _run_all(path, "--set", "seed=3")
    assert res.counts["ran"] == [] and not fake_steps.exists()
    assert res.counts["results"]["map"] == pytest.approx(0.08)

    # the file changed (pca_dim affects B on): B..E rerun with it
    d = json.loads(original)
    d["pca_dim"] = 16
    path.write_text(json.dumps(d))
    res = _run_all(path, "--set", "seed=3")
    assert res.counts["ran"] == list("BCDE")
    assert [g[:3] for g in _read_log(fake_steps)] == [[k, 16, 3] for k in "BCDE"]
    assert res.counts["results"]["map"] == pytest.approx(0.16)


def test_steps_get_no_override_twice(tmp_path):
    """--set / --data-root / --runs-root are inside the snapshot: run_all does not pass
    them on, and a step given both a snapshot and one of them refuses."""
    path = make_dataset(tmp_path / "d")
    p = cli.make_parser("x", "")
    args = p.parse_args([str(path), "--set", "seed=3", "--data-root", str(tmp_path), "-q"])
    assert cli.step_arguments(args) == ["--quiet"]
    snap = pipeline.write_snapshot(cli.load_from_args(args))
    assert snap["seed"] == 3 and snap.source == path.resolve()
    snap_file = str(pipeline.snapshot_path(snap))
    args = p.parse_args([str(path), cli.SNAPSHOT_OPTION, snap_file])
    assert dict(cli.load_from_args(args)) == dict(snap)
    args = p.parse_args([str(path), cli.SNAPSHOT_OPTION, snap_file, "--set", "seed=4"])
    with pytest.raises(SettingsError, match="already holds every override"):
        cli.load_from_args(args)
