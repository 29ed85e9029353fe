"""What a user sees when they get the settings wrong: one line, exit code 2, nothing
written. Runs the real scripts as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_inputs_and_outputs(script):
    proc = run(script, "--help")
    assert proc.returncode == 0
    assert "settings" in proc.stdout.lower()
    assert len(proc.stdout) > 300, "--help should explain what the step reads and writes"
