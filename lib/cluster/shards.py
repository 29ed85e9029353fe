"""Shards of steps A and C on a Dask cluster: the plan, the task each worker runs, the
files it leaves, and the driver's merge into the single-process artefacts.

The shard contract:

* **Plan.** The step's id list (database order) is cut into consecutive shards of
  ``shard_size`` ids (step C: rounded up to whole 32-image assignment batches, so a
  fresh run assigns exactly the batches of the single process). A shard's work is its
  ids that are not stored yet. The plan lives in a job folder named by a hash of what
  defines the output (store, settings, id list, shard size, compute record), beside the
  store it fills: ``.<store>.shards/<hash>/``.
* **Task.** A worker computes its shard with the step's own code (the extraction loop,
  the assignment loop, the streaming sink) and writes the exact store values it would
  have put (``shard-NNNNN.bin``, written atomically), then ``shard-NNNNN.json``: the
  ids, value lengths, unreadable images and the worker's compute record. The JSON is
  the done marker: a shard with one is never computed again, so a rerun after a crash
  (of a worker or of the driver) redoes only unfinished shards.
* **Merge.** The driver, the only writer of the LMDB stores (one writer per
  environment), puts each finished shard's values into the store in plan order, one
  transaction per shard. The stores' keys, values and metadata are then the single
  process's. The job folder is removed when every shard is merged.
* **Bytes.** On the CPU a map does not depend on the batch it was computed in (checked
  for EfficientNet-Lite0, VGG16 and ResNet-50 at one and two threads) but does depend on
  torch's intra-op thread count (``tests/test_threads.py``). So every task runs with the
  driver's thread count (``OMP_NUM_THREADS`` of the command that starts the step), and
  every worker must report the compute record the store holds; a cluster that mixes
  devices (a GPU worker beside CPU-only ones) is refused before any work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lib.artefacts import atomic_path, canonical_hash, write_json_atomic
from lib.errors import UserError

log = logging.getLogger("blcf.cluster")

ASSIGN_BATCH = 32  # lib.index.step.BATCH_IMAGES (not imported: workers import less)
_CACHE: dict[str, Any] = {}  # per worker process: networks and models, by settings


# --------------------------------------------------------------------------- plan + files


def plan(ids: Sequence[str], shard_size: int) -> list[list[str]]:
    """Consecutive shards of ``shard_size`` ids, in order."""
    n = max(1, int(shard_size))
    return [list(ids[i:i + n]) for i in range(0, len(ids), n)]


def job_folder(target: Path, identity: Mapping[str, Any]) -> Path:
    """``.<target name>.shards/<hash of identity>`` beside ``target``; job folders of other
    plans (other settings or shard size) are removed."""
    base = target.parent / f".{target.name}.shards"
    job = base / canonical_hash(dict(identity))
    if base.is_dir():
        for old in base.iterdir():
            if old != job and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    job.mkdir(parents=True, exist_ok=True)
    return job


def remove_job(job: Path) -> None:
    shutil.rmtree(job, ignore_errors=True)
    with contextlib.suppress(OSError):
        job.parent.rmdir()


def ids_digest(ids: Sequence[str]) -> str:
    return canonical_hash(list(ids))


def _marker(job: Path, name: str) -> Path:
    return job / f"{name}.json"


def read_marker(job: Path, name: str, todo: Sequence[str]) -> dict[str, Any] | None:
    """The finished shard's record when it covers every id of ``todo``, else None."""
    p = _marker(job, name)
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not set(todo) <= set(rec.get("covers", [])) or not (job / f"{name}.bin").is_file():
        return None
    return rec


def shard_values(job: Path, name: str, rec: Mapping[str, Any]) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of a finished shard, in the order they were computed."""
    data = (job / f"{name}.bin").read_bytes()
    out, o = [], 0
    for i, n in zip(rec["ids"], rec["lengths"]):
        out.append((i.encode("utf-8"), data[o:o + n]))
        o += n
    if o != len(data):
        raise UserError(f"{job / name}.bin: {len(data)} bytes, its record lists {o}; delete "
                        f"{job} and rerun")
    return out


class _ValueWriter:
    """Appends encoded store values to a shard file (the worker's side of the merge)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.ids: list[str] = []
        self.lengths: list[int] = []

    def add(self, image_id: str, value: bytes) -> None:
        self.f.write(value)
        self.ids.append(image_id)
        self.lengths.append(len(value))


@contextlib.contextmanager
def _shard_values(job: Path, name: str) -> Iterator[_ValueWriter]:
    """The shard's value file, written under a temporary name and synced before it takes
    its own: a killed worker leaves no half file that the merge could read."""
    with atomic_path(job / f"{name}.bin") as tmp, open(tmp, "wb") as f:
        w = _ValueWriter(f)
        yield w
        f.flush()
        os.fsync(f.fileno())


def _already_done(job: Path, name: str, todo: Sequence[str],
                  threads: Mapping[str, int | None]) -> dict[str, Any] | None:
    """A worker's first move on a shard: the summary of its done marker when an earlier
    attempt finished it (nothing is redone), else None after pinning this worker's
    threads to the driver's."""
    done = read_marker(job, name, todo)
    if done is not None:
        return {**_summary(done), "skipped": True}
    _set_threads(threads)
    return None


def _finish(job: Path, name: str, covers: Sequence[str], w: _ValueWriter,
            extra: Mapping[str, Any]) -> dict[str, Any]:
    rec = {"name": name, "covers": list(covers), "ids": w.ids, "lengths": w.lengths,
           "host": os.uname().nodename, "pid": os.getpid(), **extra}
    write_json_atomic(_marker(job, name), rec)
    return rec


def _summary(rec: Mapping[str, Any]) -> dict[str, Any]:
    """What a task returns to the driver (the marker file holds the rest)."""
    return {k: v for k, v in rec.items() if k not in ("covers", "ids", "lengths")}


# --------------------------------------------------------------------------- worker side


def _set_threads(threads: Mapping[str, int | None]) -> None:
    """The driver's thread counts, in this worker process (see the module doc).

    faiss first, torch last. Where torch and faiss share one OpenMP runtime (a worker that
    imported torch first), faiss's call changes torch's count too: with torch set first,
    a worker's second task ran with faiss's count. A driver that imported faiss first
    holds two runtimes and can send two different counts, so this happened. Torch's
    count is the one the feature bits depend on, so it is set last; in such a worker
    faiss then runs with torch's count (faiss's results do not depend on it)."""
    import torch

    if threads.get("faiss"):
        with contextlib.suppress(ImportError, AttributeError):
            import faiss

            faiss.omp_set_num_threads(int(threads["faiss"]))
    if threads.get("torch"):
        torch.set_num_threads(int(threads["torch"]))


def driver_threads() -> dict[str, int | None]:
    """This process's thread counts, which every task reproduces."""
    import torch

    out: dict[str, int | None] = {"torch": torch.get_num_threads(), "faiss": None}
    with contextlib.suppress(ImportError, AttributeError):
        import faiss

        out["faiss"] = int(faiss.omp_get_max_threads())
    return out


def _decode_settings(settings: Any) -> Any:
    """Decode workers are child processes: a daemonic Dask worker may not start them, so
    it decodes in the task's own process (slower, same bytes)."""
    if int(settings["num_workers"]) > 0 and multiprocessing.current_process().daemon:
        log.warning("daemonic Dask worker: decoding in the task process (start workers "
                    "with DASK_DISTRIBUTED__WORKER__DAEMON=False for decode workers)")
        return settings.replace(num_workers=0)
    return settings


def worker_compute(device: str, cpu_kernels: str, threads: Mapping[str, int | None]
                   ) -> dict[str, Any]:
    """The compute record this worker would write (device and thread count)."""
    from lib.features.extraction import compute_record, pick_device

    _set_threads(threads)
    try:
        return compute_record(pick_device(device), cpu_kernels)
    except UserError as e:
        return {"error": str(e)}


def _extractor(settings: Any) -> Any:
    from lib.features.extraction import Extractor

    key = "ext:" + canonical_hash({k: settings[k] for k in (
        "network", "weights", "weights_file", "layers", "device", "precision", "resize",
        "input_size", "max_side", "antialias")} | {"kernels": settings["cpu_kernels"]})
    if key not in _CACHE:
        _CACHE[key] = Extractor(settings)
    return _CACHE[key]


def _models(settings: Any, n_candidates: int | None = None) -> tuple[Any, Any]:
    """PCA and codebook, loaded (and checked) once per worker process; ``n_candidates``
    (the driver's tuned shortlist) is set on the codebook when given."""
    from lib.provenance import load_models, models_paths

    files = models_paths(settings)
    key = "models:" + canonical_hash({"s": settings.as_dict(), "m": [
        (str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in map(Path, files)]})
    if key not in _CACHE:
        _CACHE[key] = load_models(settings)
    pca, cb = _CACHE[key]
    if n_candidates is not None:
        cb.n_candidates = int(n_candidates)
    return pca, cb


def _guard(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Errors the user can fix come back as a result (the driver raises them), so Dask
    does not retry them; anything else is raised and retried."""

    def run(*args: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            r = fn(*args)
        except UserError as e:
            return {"error": str(e)}
        r["task_s"] = time.perf_counter() - t0
        return r

    run.__name__ = fn.__name__
    run.__qualname__ = fn.__qualname__
    return run


def _extract_shard(settings: Any, todo: list[str], job: str, name: str,
                   threads: Mapping[str, int | None], expected: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """Step A on one shard: decode, forward, encode the store values (worker side)."""
    from lib.features.extraction import compute_record, fill_batches
    from lib.features.feature_store import encode_record

    jobp = Path(job)
    if (skipped := _already_done(jobp, name, todo, threads)) is not None:
        return skipped
    settings = _decode_settings(settings)
    t0 = time.perf_counter()
    ext = _extractor(settings)
    setup_s = time.perf_counter() - t0
    mine = compute_record(ext.device, settings["cpu_kernels"])
    if dict(mine) != dict(expected):
        raise UserError(f"cluster worker {os.uname().nodename} (pid {os.getpid()}) would "
                        f"extract with {mine}, the store holds {dict(expected)}; run every "
                        "worker on the same device type with the same thread count")
    layers, dtype = list(settings["layers"]), settings["feature_dtype"]
    corrupt: dict[str, str] = {}
    with _shard_values(jobp, name) as w:

        class Sink:
            def put_many(self, records: Sequence[tuple[str, Any, Any]]) -> None:
                for i, maps, size in records:
                    w.add(i, encode_record([maps[ly] for ly in layers], size, dtype))

        res = fill_batches(ext, settings, Sink(), todo, {}, todo, corrupt, None,
                           desc=f"A: {name}")
    rec = _finish(jobp, name, todo, w, {
        "corrupt": corrupt, "compute": mine, "setup_s": setup_s, "loop_s": res["loop_s"],
        "forward_s": res["forward_s"], "wait_s": res["wait_s"], "n": len(w.ids)})
    return _summary(rec)


def _assign_shard(settings: Any, todo: list[str], job: str, name: str,
                  threads: Mapping[str, int | None], n_candidates: int | None,
                  asg_meta: Mapping[str, Any], scale: float = 1.0) -> dict[str, Any]:
    """Step C's assignment of one shard from the feature store (worker side); an extra
    ``scale`` of ``scales`` reads that scale's store with scale 1's models."""
    from lib.features.feature_store import FeatureStore, record_size_hw
    from lib.features.local_features import LocalFeatureReader
    from lib.features.scales import at_scale
    from lib.index.step import assign_all

    jobp = Path(job)
    if (skipped := _already_done(jobp, name, todo, threads)) is not None:
        return skipped
    t0 = time.perf_counter()
    pca, cb = _models(settings, n_candidates)
    if scale != 1.0:
        settings = at_scale(settings, scale)
    store = FeatureStore(FeatureStore.path_for(settings))
    setup_s = time.perf_counter() - t0
    try:
        sizes = {}
        with store.env.begin(buffers=True) as txn:
            for i in todo:
                sizes[i] = record_size_hw(txn.get(i.encode("utf-8")))
        nd = settings["new_dim"]
        reader = LocalFeatureReader(store, list(nd) if nd else None,
                                    l2norm=settings["l2norm"], pca=pca)
        t1 = time.perf_counter()
        with _shard_values(jobp, name) as w:
            assign_all(todo, reader, sizes, cb, _AssignSink(w, asg_meta),
                       float(settings["keep_cells"]))
    finally:
        store.close()
    rec = _finish(jobp, name, todo, w, {"corrupt": {}, "setup_s": setup_s,
                                        "loop_s": time.perf_counter() - t1, "n": len(w.ids)})
    return _summary(rec)


class _AssignSink:
    """Stands in for the assignment store in a worker: same ``meta``, same encoding."""

    def __init__(self, w: _ValueWriter, meta: Mapping[str, Any]) -> None:
        self.w = w
        self.meta = dict(meta)

    def put_many(self, records: Sequence[tuple[Any, ...]]) -> None:
        from lib.index.assignment_store import encode

        for r in records:
            self.w.add(r[0], encode(*r[1:]))


def _stream_shard(settings: Any, todo: list[str], job: str, name: str,
                  threads: Mapping[str, int | None], n_candidates: int | None,
                  asg_meta: Mapping[str, Any], scale: float = 1.0) -> dict[str, Any]:
    """Streamed distractors of one shard: decode, forward, assign (worker side); an
    extra ``scale`` of ``scales`` extracts at that scale and assigns with scale 1's
    models."""
    from lib.features.extraction import fill_batches
    from lib.features.scales import at_scale
    from lib.index.streaming import AssigningSink

    jobp = Path(job)
    if (skipped := _already_done(jobp, name, todo, threads)) is not None:
        return skipped
    settings = _decode_settings(settings)
    t0 = time.perf_counter()
    pca, cb = _models(settings, n_candidates)
    if scale != 1.0:
        settings = at_scale(settings, scale)
    ext = _extractor(settings)
    setup_s = time.perf_counter() - t0
    corrupt: dict[str, str] = {}
    with _shard_values(jobp, name) as w:
        sink = AssigningSink(settings, pca, cb, _AssignSink(w, asg_meta))  # type: ignore[arg-type]
        res = fill_batches(ext, settings, sink, todo, {}, todo, corrupt, None,
                           desc=f"C: {name}")
    rec = _finish(jobp, name, todo, w, {
        "corrupt": corrupt, "setup_s": setup_s, "loop_s": res["loop_s"],
        "forward_s": res["forward_s"], "assign_s": sink.assign_s, "n": len(w.ids)})
    return _summary(rec)


def _partition_shard(apath: str, ids: list[str], doc_offset: int, weighting: str,
                     n_words: int, out: str) -> dict[str, Any]:
    """One inverted-file partition (docs ``doc_offset, ...``) from the assignment store."""
    from lib.index.assignment_store import AssignmentStore
    from lib.index.encoding import database_vector
    from lib.index.inverted_file import build_partition

    t0 = time.perf_counter()
    with AssignmentStore(Path(apath)) as asg:
        build_partition(Path(out), (database_vector(asg.get(i)[0], weighting, n_words)
                                    for i in ids), n_words, doc_offset)
    dt = time.perf_counter() - t0
    return {"name": Path(out).name, "n": len(ids), "loop_s": dt, "task_s": dt}


# --------------------------------------------------------------------------- driver side


def cluster_compute_record(engine: Any, settings: Any) -> dict[str, Any]:
    """The compute record every worker reports for this run (device and, on the CPU, the
    driver's thread count); workers that disagree are refused, naming them."""
    recs = engine.on_workers(worker_compute, settings["device"], settings["cpu_kernels"],
                             driver_threads())
    errors = [r["error"] for r in recs.values() if "error" in r]
    if errors:
        raise UserError(f"cluster: {errors[0]}")
    distinct = {json.dumps(r, sort_keys=True) for r in recs.values()}
    if len(distinct) != 1:
        listing = "; ".join(f"{w}: {r}" for w, r in sorted(recs.items()))
        raise UserError(f"cluster: the workers would compute differently ({listing}); one "
                        "store must come from one device type and thread count: set device "
                        "or use workers of one kind")
    return json.loads(distinct.pop())


class _Merger:
    """Merges finished shards into an LMDB environment in plan order (one transaction
    per shard), whatever order they finish in."""

    def __init__(self, env: Any, job: Path, names: Sequence[str], empty: set[int],
                 what: str = "store") -> None:
        self.env = env
        self.what = what  # names the store in a write error
        self.empty = empty
        self.job = job
        self.names = list(names)
        self.recs: dict[int, dict[str, Any]] = {}
        self.next = 0
        self.merge_s = 0.0
        self.done: list[str] = []
        self.corrupt: dict[str, str] = {}

    def add(self, i: int, rec: Mapping[str, Any]) -> None:
        self.recs[i] = dict(rec)
        while self.next in self.recs:
            self._merge(self.next)
            self.next += 1

    def _merge(self, i: int) -> None:
        from lib.features.feature_store import write_growing

        if i in self.empty:
            return
        t0 = time.perf_counter()
        name = self.names[i]
        rec = json.loads(_marker(self.job, name).read_text(encoding="utf-8"))
        items = shard_values(self.job, name, rec)

        def fill(txn: Any) -> None:
            for k, v in items:
                txn.put(k, v)

        if items:
            write_growing(self.env, fill, self.what)
        self.done.extend(rec["ids"])
        self.corrupt.update(rec.get("corrupt", {}))
        self.merge_s += time.perf_counter() - t0


def _run_shards(engine: Any, task: Callable[..., dict[str, Any]], env: Any, job: Path,
                shards: Sequence[list[str]], args: Callable[[list[str], str], tuple[Any, ...]],
                desc: str, what: str) -> tuple[_Merger, dict[str, Any]]:
    """Submit the unfinished shards, merge every shard in order into the ``what`` (the
    store's name in errors), return the merger and the timings (wall, per-task
    overhead, merge time)."""
    names = [f"shard-{i:05d}" for i in range(len(shards))]
    merger = _Merger(env, job, names, empty={i for i, s in enumerate(shards) if not s},
                     what=what)
    pending = [i for i, s in enumerate(shards) if s and read_marker(job, names[i], s) is None]
    # shards finished by an earlier, interrupted run are merged, never recomputed
    reused = [i for i, s in enumerate(shards) if s and i not in set(pending)]
    for i in [i for i, s in enumerate(shards) if i not in set(pending)]:
        merger.add(i, {})
    t0 = time.perf_counter()
    stats = None
    if pending:
        tag = job.name[:8]
        engine.map_shards(_guard(task), [args(shards[i], names[i]) for i in pending],
                          [f"{desc.split(':')[0]}-{tag}-{names[i]}" for i in pending], desc,
                          units=[len(shards[i]) for i in pending],
                          on_result=lambda k, r: merger.add(pending[k], r))
        stats = engine.last
    timing = {"wall_s": time.perf_counter() - t0, "merge_s": merger.merge_s,
              "tasks": len(pending), "reused": len(reused),
              "n_workers": stats.n_workers if stats else 0,
              "busy_s": stats.busy_s if stats else 0.0,
              "overhead_per_task_s": stats.overhead_per_task_s() if stats else 0.0,
              "per_task": stats.per_task if stats else []}
    if merger.next != len(shards):
        raise UserError(f"cluster: shards {merger.next}.. were not merged ({job})")
    log.info("%s: %d tasks (%d reused) on %d workers in %.1f s, %.2f s overhead per task, "
             "merge %.2f s", desc, timing["tasks"], timing["reused"], timing["n_workers"],
             timing["wall_s"], timing["overhead_per_task_s"], timing["merge_s"],
             extra={"cluster_timing": {"what": desc, **timing}})
    return merger, timing


def extract_on_cluster(engine: Any, settings: Any, store: Any, image_ids: Sequence[str],
                       todo: Sequence[str], corrupt: dict[str, str],
                       compute: Mapping[str, Any]) -> dict[str, Any]:
    """Step A's loop on the cluster: the result dict of
    :func:`lib.features.extraction.fill_batches` (plus ``cluster`` timings)."""
    todo_set = set(todo)
    shards = [[i for i in s if i in todo_set] for s in plan(image_ids, settings["shard_size"])]
    job = job_folder(Path(store.path), {
        "step": "A", "store": Path(store.path).name, "settings": settings.step_hash("A"),
        "ids": ids_digest(image_ids), "shard_size": settings["shard_size"],
        "compute": dict(compute)})
    threads = driver_threads()
    t0 = time.perf_counter()
    merger, timing = _run_shards(
        engine, _extract_shard, store.env, job, shards,
        lambda ids, name: (settings, ids, str(job), name, threads, dict(compute)),
        "A: extracting (cluster)", "feature store")
    for i, why in merger.corrupt.items():
        log.warning("skipped %s: %s", i, why)
    corrupt.update(merger.corrupt)
    remove_job(job)
    loop_s = time.perf_counter() - t0
    fw = sum(float(t.get("forward_s", 0.0)) for t in timing["per_task"])
    return {"done": set(merger.done), "forward_s": fw, "loop_s": loop_s, "wait_s": 0.0,
            "interrupted": False, "cluster": timing}


def _c_job(settings: Any, target: Path, kind: str, ids: Sequence[str], shard_size: int,
           asg_meta: Mapping[str, Any], n_candidates: int | None) -> Path:
    record = {k: v for k, v in asg_meta.items()
              if k not in ("count", "versions", "settings_hash", "created")}
    return job_folder(target, {"step": kind, "record": record, "ids": ids_digest(ids),
                               "shard_size": shard_size, "n_candidates": n_candidates})


def assign_on_cluster(engine: Any, settings: Any, asg: Any, ids: Sequence[str],
                      todo: Sequence[str], n_candidates: int | None,
                      scale: float = 1.0) -> dict[str, Any]:
    """Step C's assignment of ``todo`` (a subset of ``ids``, database order) on the
    cluster, merged into the assignment store ``asg`` (of ``scale``, for ``scales``).
    Shards are whole 32-image batches."""
    size = -(-int(settings["shard_size"]) // ASSIGN_BATCH) * ASSIGN_BATCH
    todo_set = set(todo)
    shards = [[i for i in s if i in todo_set] for s in plan(ids, size)]
    job = _c_job(settings, Path(asg.path), "C-assign", ids, size, asg.meta, n_candidates)
    threads = driver_threads()
    meta = dict(asg.meta)
    merger, timing = _run_shards(
        engine, _assign_shard, asg.env, job, shards,
        lambda s, name: (settings, s, str(job), name, threads, n_candidates, meta, scale),
        "C: assigning (cluster)", "assignment store")
    remove_job(job)
    return {"assigned": len(merger.done), "cluster": timing}


def stream_on_cluster(engine: Any, settings: Any, ids: Sequence[str], pca: Any, cb: Any,
                      asg: Any, scale: float = 1.0) -> dict[str, Any]:
    """:func:`lib.index.streaming.stream_assignments` on the cluster: same checks, same
    values, same ``assignments.corrupted.txt``; the same result dict. ``scale``: an
    extra scale of ``scales`` (``asg`` is that scale's store)."""
    from lib.features.extraction import split_bad_ids
    from lib.features.feature_store import write_corrupted
    from lib.features.scales import at_scale
    from lib.index.streaming import _HINT, check_models, stored_sizes
    from lib.provenance import assignment_record, check_assignment_record

    t_start = time.perf_counter()
    ids = list(ids)
    if len(set(ids)) != len(ids):
        raise UserError("distractor list: duplicate image ids")
    check_models(settings, pca, cb)
    scaled = settings if scale == 1.0 else at_scale(settings, scale)
    check_assignment_record(assignment_record(scaled, pca, cb), asg.meta, str(asg.path),
                            _HINT)
    ids, bad_ids = split_bad_ids(ids)
    stored = stored_sizes(asg)
    todo = [i for i in ids if i not in stored]
    corrupt: dict[str, str] = dict(bad_ids)
    n_cand = getattr(cb, "n_candidates", None)
    timing: dict[str, Any] = {}
    n_new = 0
    if todo:
        todo_set = set(todo)
        shards = [[i for i in s if i in todo_set] for s in plan(ids, settings["shard_size"])]
        job = _c_job(settings, Path(asg.path), "C-stream", ids, settings["shard_size"],
                     asg.meta, n_cand)
        threads = driver_threads()
        meta = dict(asg.meta)
        merger, timing = _run_shards(
            engine, _stream_shard, asg.env, job, shards,
            lambda s, name: (settings, s, str(job), name, threads, n_cand, meta, scale),
            "C: streaming distractors (cluster)", "assignment store")
        for i, why in merger.corrupt.items():
            log.warning("skipped %s: %s", i, why)
        corrupt.update(merger.corrupt)
        n_new = len(merger.done)
        remove_job(job)
    if todo or corrupt:
        write_corrupted(asg.path, corrupt.items())
    loop_s = float(timing.get("wall_s", 0.0))
    return {"streamed": n_new, "skipped": len(ids) - len(todo), "corrupt": len(corrupt),
            "corrupt_ids": sorted(corrupt), "interrupted": False,
            "seconds": time.perf_counter() - t_start, "loop_seconds": loop_s,
            "images_per_s": n_new / loop_s if loop_s > 0 else 0.0,
            "device": engine.describe(), "cluster": timing}


def partitions_on_cluster(engine: Any, settings: Any, apath: Path, present: Sequence[str],
                          n_words: int, folder: Path) -> tuple[list[Path], dict[str, Any]]:
    """Inverted-file partitions of ``present`` (database order), one per shard, built by
    the workers from the assignment store (which the driver does not write meanwhile)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shards = plan(present, settings["shard_size"])
    parts = [folder / f"part-{i:05d}" for i in range(len(shards))]
    offsets = [0]
    for s in shards:
        offsets.append(offsets[-1] + len(s))
    t0 = time.perf_counter()
    engine.map_shards(_partition_shard,
                      [(str(apath), s, offsets[i], settings["weighting"], n_words, str(parts[i]))
                       for i, s in enumerate(shards)],
                      [f"C-index-{folder.name}-{i:05d}" for i in range(len(shards))],
                      "C: index partitions (cluster)", units=[len(s) for s in shards])
    timing = {"what": "C: index partitions", "wall_s": time.perf_counter() - t0,
              "tasks": len(shards), "n_workers": engine.last.n_workers,
              "overhead_per_task_s": engine.last.overhead_per_task_s()}
    log.info("C: %d index partitions in %.1f s", len(shards), timing["wall_s"],
             extra={"cluster_timing": timing})
    return parts, timing
