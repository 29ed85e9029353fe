"""Running the five steps in order, skipping those whose output is up to date, and the
record every step's library entry point returns (:class:`StepResult`).

One entry point per step, each taking the validated :class:`lib.settings.Settings`:
A :func:`lib.features.step.extract_features`, B :func:`lib.vocabulary.step.train_models`,
C :func:`lib.index.step.build_index`, D :func:`lib.search.step.rank_bow` (and the pooling
baseline :func:`lib.search.step.rank_pooling`), E :func:`lib.evaluation.step.evaluate_run`,
T :func:`lib.learned.step.fine_tune`. The scripts in ``bow_pipeline/`` only parse their
arguments and call one of them through :func:`lib.cli.run_step`.

Why a stamp file: each step is resumable on its own (A and C skip stored images), but B
(k-means) and D (every query through the network) redo their work when called again.
``<path_output>/run_state.json`` records, per step, the settings hash of every key that
affects it (``Settings.step_hash``) when it last finished. A step is up to date when that
hash is unchanged, its outputs exist, and no earlier step ran in this invocation.

Why :func:`run_all` starts each step as its own process (the step's script, exactly the
command a user would type) instead of calling the entry points in one process:

* a step that dies from a signal (SIGBUS on a damaged or truncated memory-mapped store,
  the OOM killer's SIGKILL) would take ``run_all`` down with it and nothing would say
  which step it was; as a child, its death is an exit status that ``run_all`` reports
  with the step named, and ``run_state.json`` still holds every step finished before;
* each step's memory (B's k-means sample, torch and its caching allocator, the FAISS and
  OpenMP thread pools, memory the allocator keeps: :mod:`lib.allocator`) is returned to
  the system when its process ends, before the next step starts, instead of adding up.

One snapshot of the settings: :func:`run_all` writes the settings it validated (every
``--set`` applied, every path absolute, no ``extends``) to
``<path_output>/.run_all_settings.json`` (:func:`write_snapshot`) and starts every step on
that file (``--settings-snapshot``, :func:`lib.cli.load_from_args`), not on the user's
file: an edit to the settings file while ``run_all`` runs reaches none of its steps, and
the hashes ``run_state.json`` records are those of the settings the steps used. The
snapshot stays after the run: it is what the last ``run_all`` ran with.

Console: one line when a step starts, the step's own summary line, one when it is done,
and the final mAP. The steps run with ``--quiet`` (``-v`` when run_all has it,
:func:`lib.cli.step_arguments`), so their INFO logs stay off the console; warnings,
errors and the steps' progress bars (on stderr, erased when done) still show.

Pre-flight (:func:`preflight`): before step A, the settings are checked against what can
be known from the ground truth alone: ``n_centers`` against the largest training sample
the database can give (:func:`lib.vocabulary.sizing.check_codebook_size`), and one
warning names the queries without positives.

Locking: :func:`run_all` holds the output folder's lock (and that of ``path_features`` /
``path_models`` where they lie outside ``path_output``, :func:`shared_folders`) for its
whole duration, so a second run cannot slip in between two steps; each step process
inherits the held descriptors and takes the locks over (:func:`lib.artefacts.output_lock`).
A step started on its own locks the shared folder it writes (:func:`lib.cli.run_step`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.artefacts import LOCK_ENV, inheritable_locks, output_lock, read_json, write_json_atomic
from lib.cli import SNAPSHOT_OPTION
from lib.errors import UserError
from lib.settings import Settings, load_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one step did: every step's library entry point returns one, its script prints
    ``summary``, and callers (the tests, notebooks) read the rest."""

    step: str  # "A".."E", "T", "D-pooling", or "run_all"
    summary: str  # what the script prints: one line (two for C when streaming)
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


# the shared folders each step writes (A the feature stores, B and T the models)
WRITES = {"A": ("path_features",), "B": ("path_models",), "T": ("path_models",)}


def shared_folders(s: Settings, steps: Sequence[str]) -> list[Path]:
    """The ``path_features`` / ``path_models`` folders that ``steps`` write and that lie
    outside ``path_output`` (shared between runs, as in the 105k settings), whose
    ``.lock`` the writing step takes besides the output folder's."""
    out = Path(s.path_output).resolve()
    found: list[Path] = []
    for step in steps:
        for key in WRITES.get(step, ()):
            folder = Path(s[key]).resolve()
            if folder != out and out not in folder.parents and folder not in found:
                found.append(folder)
    return found


@contextlib.contextmanager
def step_locks(s: Settings, steps: Sequence[str], holder: str):
    """Hold the locks of :func:`shared_folders` for ``steps`` (LockedError if taken)."""
    with contextlib.ExitStack() as stack:
        for folder in shared_folders(s, steps):
            stack.enter_context(output_lock(folder, holder))
        yield


SNAPSHOT_NAME = ".run_all_settings.json"


def snapshot_path(s: Settings) -> Path:
    return Path(s.path_output) / SNAPSHOT_NAME


def write_snapshot(s: Settings) -> Settings:
    """Write ``s`` as a self-contained settings file (every key, paths absolute, no
    ``extends``: loading it needs neither ``--set`` nor the data and runs roots) to
    :func:`snapshot_path`, atomically, and return it loaded back (validated again) with
    ``s.source`` as its source. Raises RuntimeError if the reloaded settings differ."""
    path = snapshot_path(s)
    values = s.as_dict()
    write_json_atomic(path, {"//": f"written by run_all from {s.source}; every step of "
                                   "that run read these settings, not that file", **values})
    back = Settings(dict(load_settings(path)), Path(s.source))

    def canon(x: Settings) -> str:
        return json.dumps(x.as_dict(), sort_keys=True)

    if canon(back) != canon(s):  # a key that does not survive JSON: a bug, not the user's
        raise RuntimeError(f"{path}: the settings snapshot does not load back unchanged")
    return back


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


def preflight(s: Settings, only: Sequence[str] | None = None) -> None:
    """Refuse before step A what the ground truth and the settings alone show cannot
    work (an ``n_centers`` above the training sample the database can give), and warn
    once about queries without positives. A ground truth that cannot be read is left
    to step A to report."""
    from lib.groundtruth.loader import (
        DISTRACTOR_PREFIX,
        load_ground_truth,
        warn_without_positives,
    )
    from lib.vocabulary.sizing import check_codebook_size

    try:
        gt = load_ground_truth(s)
    except UserError:
        return
    warn_without_positives(gt, s["path_gt"])
    if only and not {"A", "B"} & set(only):
        return
    ids = gt.db_ids
    if s["stream_distractors"]:  # not in A's store: B never trains on them
        ids = [i for i in ids if not i.startswith(DISTRACTOR_PREFIX)]
    check_codebook_size(s, len(ids))


def run_all(s: Settings, arguments: Sequence[str] = (), force: Sequence[str] = (),
            only: Sequence[str] | None = None) -> StepResult:
    """Run A..E, each as its own process (see the module docstring for why), on one
    snapshot of ``s`` (:func:`write_snapshot`), with ``arguments`` (the command-line options
    a step still needs, :func:`lib.cli.step_arguments`) after the settings file. A failed
    step raises UserError naming it (its exit code kept for 2, 3 and 130). ``counts``: the
    steps run and skipped, and step E's parsed results.json (empty when there is none);
    the summary is the final mAP line.

    The output folder (and the shared folders of :func:`shared_folders`) stay locked for
    the whole run; the steps take the locks over (module docstring)."""
    if isinstance(s, Settings):  # before the lock creates the output folder
        preflight(s, only)
    with output_lock(s.path_output, "run_all"), step_locks(s, "AB", "run_all"):
        return _run_all(s, arguments, force, only)


def _run_all(s: Settings, arguments: Sequence[str], force: Sequence[str],
             only: Sequence[str] | None) -> StepResult:
    t_start = time.perf_counter()
    # every step reads this one snapshot (module docstring); a stand-in that is no
    # Settings (tests/test_lock.py) has none to write, its steps read its source
    snapshot: list[str] = []
    if isinstance(s, Settings):
        s = write_snapshot(s)
        snapshot = [SNAPSHOT_OPTION, str(snapshot_path(s))]
    held, fds = inheritable_locks()
    child_env = {**os.environ, LOCK_ENV: held}
    state = load_state(s)
    earlier_ran = False
    ran: list[str] = []
    skipped: list[str] = []
    for i, step in enumerate(STEPS, 1):
        if only and step.key not in only:
            continue
        if not earlier_ran and step.key not in force and up_to_date(step, s, state):
            print(f"[{i}/5] {step.key} {step.title}: up to date, skipped", flush=True)
            skipped.append(step.key)
            continue
        t0 = time.perf_counter()
        cmd = [sys.executable, str(SCRIPTS / step.script), str(s.source), *arguments,
               *snapshot]
        # the step's progress bar and any error go to the terminal (stderr); its summary
        # (stdout) becomes this step's one line
        proc = subprocess.run(cmd, env=child_env, pass_fds=fds, stdout=subprocess.PIPE,
                              text=True)
        said = "; ".join(line.strip() for line in proc.stdout.splitlines() if line.strip())
        rc = proc.returncode
        if rc != 0:
            if said:
                print(f"[{i}/5] {said}", flush=True)
            raise UserError(f"step {step.key} ({step.script}) failed with exit code {rc}",
                            exit_code=rc if rc in (2, 3, 130) else 1)
        dt = time.perf_counter() - t0
        state[step.key] = {"hash": s.step_hash(step.key), "seconds": round(dt, 1),
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(state_path(s), state)
        print(f"[{i}/5] {said or f'{step.key} {step.title}: done'} ({dt:.1f} s)", flush=True)
        earlier_ran = True
        ran.append(step.key)
    bow = Path(s.path_output) / "bow"
    res_path = bow / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    summary = (f"{s.dataset}: mAP {res['map']:.4f} over {res['n_queries']} queries; "
               f"results in {bow}") if res else ""
    return StepResult("run_all", summary, (bow,), {"ran": ran, "skipped": skipped,
                                                   "results": res},
                      time.perf_counter() - t_start)
