"""Running the five steps in order, skipping those whose output is up to date.

Why a stamp file: each step is resumable on its own (A and C skip stored images), but B
(k-means) and D (every query through the network) redo their work when called again.
``<path_output>/run_state.json`` records, per step, the settings hash of every key that
affects it (``Settings.step_hash``) when it last finished. A step is up to date when that
hash is unchanged, its outputs exist, and no earlier step ran in this invocation.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.artefacts import read_json, write_json_atomic
from lib.errors import UserError
from lib.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one step did: every step's library entry point returns one, its script prints
    ``summary``, and ``run_all`` and the tests read the rest."""

    step: str  # "A".."E", "T", or "D-pooling"
    summary: str  # the one line the script prints
    outputs: tuple[Path, ...] = ()  # what it wrote (folders or files)
    counts: dict[str, Any] = field(default_factory=dict)  # images, features, queries, ...
    seconds: float = 0.0
SCRIPTS = Path(__file__).resolve().parent.parent / "bow_pipeline"


@dataclass(frozen=True)
class Step:
    key: str  # A..E, the settings-hash step
    script: str
    title: str

    def outputs(self, s: Settings) -> list[Path]:
        out = Path(s.path_output)
        return {
            "A": [Path(s.path_features)],
            "B": [Path(s.path_models) / "pca.npz", Path(s.path_models) / "codebook.npy"],
            "C": [out / "assignments.lmdb", out / "index" / "meta.json"],
            "D": [out / "bow" / "queries.txt"],
            "E": [out / "bow" / "map.txt", out / "bow" / "results.json"],
        }[self.key]


STEPS = (
    Step("A", "A_feature_extraction.py", "feature extraction"),
    Step("B", "B_processing_clustering.py", "PCA-whitening + codebook"),
    Step("C", "C_bow_representation.py", "assignment maps + inverted file"),
    Step("D", "D_rankings_BoW.py", "BoW rankings"),
    Step("E", "E_evaluate.py", "evaluation"),
)


def state_path(s: Settings) -> Path:
    return Path(s.path_output) / "run_state.json"


def load_state(s: Settings) -> dict:
    p = state_path(s)
    if not p.exists():
        return {}
    try:
        return dict(read_json(p, "run state"))
    except UserError:
        log.warning("%s is unreadable; every step will run", p)
        return {}


def up_to_date(step: Step, s: Settings, state: dict) -> bool:
    rec = state.get(step.key)
    return bool(rec) and rec.get("hash") == s.step_hash(step.key) and all(
        p.exists() for p in step.outputs(s))


def run_all(s: Settings, passthrough: Sequence[str], force: Sequence[str] = (),
            only: Sequence[str] | None = None) -> dict:
    """Run A..E as subprocesses (exactly the commands a user would type). Returns the
    parsed results.json of step E."""
    state = load_state(s)
    earlier_ran = False
    for i, step in enumerate(STEPS, 1):
        if only and step.key not in only:
            continue
        if not earlier_ran and step.key not in force and up_to_date(step, s, state):
            print(f"[{i}/5] {step.key} {step.title}: up to date, skipped", flush=True)
            continue
        print(f"[{i}/5] {step.key} {step.title}: running", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, str(SCRIPTS / step.script), str(s.source), *passthrough]
        rc = subprocess.call(cmd)
        if rc != 0:
            raise UserError(f"step {step.key} ({step.script}) failed with exit code {rc}",
                            exit_code=rc if rc in (2, 3, 130) else 1)
        dt = time.perf_counter() - t0
        state[step.key] = {"hash": s.step_hash(step.key), "seconds": round(dt, 1),
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(state_path(s), state)
        print(f"[{i}/5] {step.key} {step.title}: done in {dt:.1f} s", flush=True)
        earlier_ran = True
    res = Path(s.path_output) / "bow" / "results.json"
    return json.loads(res.read_text()) if res.exists() else {}
