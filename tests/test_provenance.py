"""Provenance of inputs: ``run_all`` reruns exactly the steps whose input files changed,
and step A extracts again the images whose files changed (lib/provenance.step_hash,
lib/features/extraction.refresh_inputs).

These start ``run_all`` as a user types it (one process per step), on the tiny generated
dataset of tests/helpers_pipeline.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_pipeline import REPO, dump_lmdb, env, make_dataset

from lib.features.networks import build_backbone
from lib.settings import load_settings


def run_all(settings: Path, *extra: str) -> str:
    p = subprocess.run([sys.executable, str(REPO / "bow_pipeline" / "run_all.py"),
                        str(settings), *extra], capture_output=True, text=True, env=env(),
                       cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def ran(out: str) -> str:
    """The steps run_all ran (not skipped), e.g. 'ABCDE'."""
    return "".join(re.findall(r"\[\d/5\] ([A-E]): ", out))


def scores(run: Path) -> np.ndarray:
    return np.load(run / "bow" / "scores.npy")


def feature_records(run: Path) -> dict[bytes, bytes]:
    store = next((run / "features").glob("*.lmdb"))
    return dump_lmdb(store)[0]


def test_run_all_reruns_exactly_the_steps_whose_input_files_changed(tmp_path: Path) -> None:
    s = make_dataset(tmp_path / "d", seed=0)
    other = make_dataset(tmp_path / "e", seed=1).parent / "images"  # same names
    spare = make_dataset(tmp_path / "f", seed=2).parent
    run = tmp_path / "d" / "run"
    assert ran(run_all(s)) == "ABCDE"
    first, feats = scores(run), feature_records(run)
    assert ran(run_all(s)) == ""  # nothing changed: every step up to date

    # another folder with the same image names: not answered from the old store
    out = run_all(s, "--set", f"path_images={other}")
    assert ran(out) == "ABCDE"
    assert "A: 8 extracted, 0 already stored" in out
    second, new = scores(run), feature_records(run)
    assert not np.array_equal(second, first)
    assert sorted(new) == sorted(feats)
    assert all(new[k] != feats[k] for k in new if not k.startswith(b"__"))

    # one rewritten photo: extracted again, and only it
    (other / "img_05.jpg").write_bytes((spare / "images" / "img_05.jpg").read_bytes())
    out = run_all(s, "--set", f"path_images={other}")
    assert ran(out) == "ABCDE"
    assert "A: 1 extracted, 7 already stored" in out
    third = feature_records(run)
    assert sorted(k for k in third if not k.startswith(b"__") and third[k] != new[k]) \
        == [b"img_05"]

    # a rewritten query photo: D and E only, and only its scores change
    before = scores(run)
    q = tmp_path / "d" / "queries" / "q_0.jpg"
    q.write_bytes((spare / "queries" / "q_0.jpg").read_bytes())
    assert ran(run_all(s, "--set", f"path_images={other}")) == "DE"
    assert not np.array_equal(scores(run)[0], before[0])
    np.testing.assert_array_equal(scores(run)[1], before[1])


def _weights(path: Path, scale: float) -> None:
    net = build_backbone("efficientnet_lite0", "random", ["s6_expand"]).net
    sd = {k: v * scale if v.is_floating_point() and "running" not in k else v
          for k, v in net.state_dict().items()}
    torch.save(sd, path)


def test_new_weights_written_over_the_same_file_rerun_every_step(tmp_path: Path) -> None:
    root = tmp_path / "d"
    s = make_dataset(root, weights="file", weights_file="w.pt")
    _weights(root / "w.pt", 1.0)
    run = root / "run"
    assert ran(run_all(s)) == "ABCDE"
    first = scores(run)
    before = os.stat(root / "w.pt").st_mtime_ns
    _weights(root / "w.pt", 0.5)
    assert os.stat(root / "w.pt").st_mtime_ns != before
    out = run_all(s)
    assert ran(out) == "ABCDE"
    assert "A: 8 extracted, 0 already stored" in out
    assert not np.array_equal(scores(run), first)
    # each weights file has a store of its own, named after its hash
    stores = sorted(p.name for p in (run / "features").glob("*.lmdb"))
    assert len(stores) == 2 and all(re.match(r"efficientnet_lite0-file[0-9a-f]{8}-", n)
                                     for n in stores)


def test_step_hash_follows_the_ground_truth_and_reused_models(tmp_path: Path) -> None:
    s_path = make_dataset(tmp_path / "d")
    s = load_settings(s_path)
    a, d = s.step_hash("A"), s.step_hash("D")
    gt = tmp_path / "d" / "gt.json"
    data = json.loads(gt.read_text())
    data["gnd"][0]["junk"] = [1]
    gt.write_text(json.dumps(data))
    assert s.step_hash("A") != a and s.step_hash("D") != d
    # reused models (TRAIN_* false): their files are B's inputs
    models = tmp_path / "models"
    models.mkdir()
    (models / "pca.npz").write_bytes(b"1")
    (models / "codebook.npy").write_bytes(b"1")
    r = s.replace(path_models=models, TRAIN_PCA=False, TRAIN_CENTROIDS=False)
    b, a2 = r.step_hash("B"), r.step_hash("A")
    (models / "codebook.npy").write_bytes(b"22")
    assert r.step_hash("B") != b and r.step_hash("A") == a2


@pytest.mark.parametrize("missing", ["path_gt", "weights_file"])
def test_step_hash_of_settings_with_missing_inputs_does_not_raise(tmp_path: Path,
                                                                  missing: str) -> None:
    """run_all decides before the step runs; the step itself reports the missing file."""
    over = {"weights": "file", "weights_file": "w.pt"} if missing == "weights_file" else {}
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "w.pt").write_bytes(b"0")
    s = load_settings(make_dataset(tmp_path / "d", **over))
    (tmp_path / "d" / ("gt.json" if missing == "path_gt" else "w.pt")).unlink()
    assert len(s.step_hash("E")) == 16
