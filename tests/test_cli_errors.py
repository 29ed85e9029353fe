"""The command line itself, the only tests that start the scripts (as subprocesses): what
a user sees when they get the settings wrong (one line, exit code 2, nothing written),
--help, and run_all running every step's script to the same outputs as the steps' entry
points give in-process (the other tests call those)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_pipeline import env, make_dataset, run_outputs, run_pipeline

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["run_all.py", "A_feature_extraction.py", "B_processing_clustering.py",
           "C_bow_representation.py", "D_rankings_BoW.py", "D_rankings_Pooling.py",
           "E_evaluate.py"]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bow_pipeline" / script), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def settings(tmp_path: Path) -> dict:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gt.json").write_text(json.dumps({"imlist": [], "qimlist": [], "gnd": []}))
    return {"dataset": "toy", "gt_format": "generic", "path_images": "imgs",
            "path_gt": "gt.json", "path_output": "out"}


def _check_one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_key(tmp_path, settings, script):
    if not (REPO / "bow_pipeline" / script).exists():
        pytest.fail(f"bow_pipeline/{script} is missing")
    settings["n_center"] = 3
    f = tmp_path / "s.json"
    f.write_text(json.dumps(settings))
    _check_one_line(run(script, str(f)), "unknown settings key 'n_center'", "s.json")
    assert not (tmp_path / "out").exists()


def test_wrong_type_and_missing_path(tmp_path, settings):
    f = tmp_path / "s.json"
    settings["pca_dim"] = "big"
    f.write_text(json.dumps(settings))
    _check_one_line(run("run_all.py", str(f)), "key 'pca_dim'", "expected an integer")
    settings["pca_dim"] = 16
    settings["path_images"] = "missing_folder"
    f.write_text(json.dumps(settings))
    _check_one_line(run("run_all.py", str(f)), "key 'path_images'", "does not exist")
    assert not (tmp_path / "out").exists()


def test_missing_settings_file(tmp_path):
    _check_one_line(run("run_all.py", str(tmp_path / "nope.json")), "settings file not found")


def test_bad_override(tmp_path, settings):
    f = tmp_path / "s.json"
    f.write_text(json.dumps(settings))
    _check_one_line(run("run_all.py", str(f), "--set", "masking=9"), "key 'masking'")
    _check_one_line(run("run_all.py", str(f), "--set", "nope=1"), "--set nope")


@pytest.mark.parametrize("script", ["run_all.py", "B_processing_clustering.py"])
def test_override_errors_name_the_override(tmp_path, settings, script):
    """A --set error names the --set (there is no file to name) and a misspelt key gets
    the closest valid one; still one line, exit code 2, nothing written."""
    f = tmp_path / "s.json"
    f.write_text(json.dumps(settings))
    proc = run(script, str(f), "--set", "masking=yes")
    _check_one_line(proc)
    assert proc.stderr.strip() == ("error: --set masking=yes: key 'masking': expected an "
                                   "integer, got 'yes'")
    proc = run(script, str(f), "--set", "n_center=5")
    _check_one_line(proc)
    assert proc.stderr.strip() == ("error: --set n_center=5: unknown settings key "
                                   "'n_center'; did you mean 'n_centers'?")
    settings["n_center"] = 3
    f.write_text(json.dumps(settings))
    _check_one_line(run(script, str(f)), f"{f}: unknown settings key 'n_center'; did you "
                    "mean 'n_centers'?")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_inputs_and_outputs(script):
    proc = run(script, "--help")
    assert proc.returncode == 0
    assert "settings" in proc.stdout.lower()
    assert len(proc.stdout) > 300, "--help should explain what the step reads and writes"


STEP_TITLES = {"A": "feature extraction", "B": "PCA-whitening + codebook",
               "C": "assignment maps + inverted file", "D": "BoW rankings", "E": "evaluation"}


def test_run_all_runs_every_script(tmp_path):
    """run_all on a tiny set: every step's script runs (its own process) and prints its
    summary line, run_all its progress and the final mAP; the outputs are those of the
    entry points called in-process; a rerun skips every step."""
    cli = make_dataset(tmp_path / "cli")
    inproc = tmp_path / "inproc"
    shutil.copytree(tmp_path / "cli", inproc)
    cmd = [sys.executable, str(REPO / "bow_pipeline" / "run_all.py"), str(cli), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 6, out  # one line per step (its summary), then the mAP
    for i, key in enumerate(STEP_TITLES, 1):
        assert re.fullmatch(rf"\[{i}/5\] {key}: .* \(\d+\.\d s\)", out[i - 1]), out
    e_line = out[-2]  # E's summary, then run_all's own line
    assert e_line.startswith("[5/5] E: mAP ") and e_line.endswith(
        str(cli.parent / "run" / "bow" / "map.txt") + e_line[e_line.rindex(" ("):])
    assert re.fullmatch(rf"tiny: mAP \d\.\d{{4}} over 2 queries; results in "
                        rf"{re.escape(str(cli.parent / 'run' / 'bow'))}", out[-1]), out[-1]
    assert e_line.split()[3] == out[-1].split()[2]  # the same mAP

    run_pipeline(inproc / "settings.json")
    got = run_outputs(cli.parent / "run", [cli.parent, inproc])
    ref = run_outputs(inproc / "run", [cli.parent, inproc])
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k] == ref[k], f"{k}: the scripts wrote other outputs than the entry points"

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.splitlines()
    assert lines[:5] == [f"[{i}/5] {k} {t}: up to date, skipped"
                         for i, (k, t) in enumerate(STEP_TITLES.items(), 1)]
    assert lines[5:] == out[-1:]


def test_run_all_refuses_an_untrainable_codebook_before_step_a(tmp_path):
    """n_centers above the training sample the database can give: one line with the
    largest valid value, exit 2, before step A starts (nothing written)."""
    path = make_dataset(tmp_path / "d")
    proc = subprocess.run([sys.executable, str(REPO / "bow_pipeline" / "run_all.py"),
                           str(path), "--set", "n_centers=5000"], capture_output=True,
                          text=True, timeout=300, env=env())
    _check_one_line(proc, "key 'n_centers': 5000 words need at least as many training "
                    "features, but 8 images of 12 features", "use n_centers <= 96, or "
                    '"auto" (9 here)')
    assert proc.stdout == ""
    assert not (tmp_path / "d" / "run").exists()
