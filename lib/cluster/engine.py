"""The Dask engine behind the ``cluster`` setting: parse it, start or join a cluster, and
map shard tasks over it with a progress bar on the driver.

Why Dask (``dask.distributed``): it already does what hand-written shard scripts get
wrong: a scheduler that hands tasks to whichever worker is free, reschedules the task of
a worker that died (SIGKILL, OOM killer, a lost node) on another one, and the same code
on a laptop (``local:N``), a SLURM allocation (``dask-jobqueue``) or any running
scheduler (``tcp://host:8786``). Dask is imported here only, and only when ``cluster``
is not ``none``: the single-process path needs nothing new.

Workers must see the same files as the driver (a shared filesystem, as on every
cluster this field uses): they read the images and models from their paths and write
shard outputs next to the run; the driver merges them (:mod:`lib.cluster.shards`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from lib.errors import UserError

log = logging.getLogger("blcf.cluster")

# a worker death reschedules its task; the scheduler gives up on a task after it has
# killed this many workers (a shard that crashes its interpreter every time)
ALLOWED_FAILURES = 3
# task-level retries for exceptions raised inside a task (a transient I/O error); the
# errors a user can fix come back as results instead, so they are not retried
TASK_RETRIES = 2
_INSTALL_HINT = "install the cluster extra: pip install -e .[cluster]"


@dataclass(frozen=True)
class ClusterSpec:
    """The parsed ``cluster`` value: ``none``, ``local`` with ``workers``, or ``address``."""

    kind: str
    workers: int = 0
    address: str | None = None


def parse_cluster(value: str) -> ClusterSpec:
    """``none`` | ``local:N`` | a scheduler address (``tcp://host:8786``)."""
    if value == "none":
        return ClusterSpec("none")
    m = re.fullmatch(r"local:([1-9][0-9]*)", value)
    if m:
        return ClusterSpec("local", workers=int(m.group(1)))
    if re.fullmatch(r"(tcp|tls|inproc|ucx)://\S+", value):
        return ClusterSpec("address", address=value)
    raise UserError(f"settings key 'cluster': {value!r} is not none, local:N or a scheduler "
                    "address such as tcp://host:8786")


@dataclass
class TaskStats:
    """What the driver learnt about one map: wall time and the per-task worker times."""

    wall_s: float = 0.0
    n_tasks: int = 0
    busy_s: float = 0.0  # sum over tasks of the time spent inside the task function
    n_workers: int = 0
    per_task: list[dict[str, Any]] = field(default_factory=list)

    def overhead_per_task_s(self) -> float:
        """Worker time not spent inside task functions, per task: scheduling, transfers,
        idle workers at the end of the map."""
        if not self.n_tasks:
            return 0.0
        return max(0.0, self.wall_s * self.n_workers - self.busy_s) / self.n_tasks


class Engine:
    """A connected Dask client (and the LocalCluster it started, if any)."""

    def __init__(self, client: Any, spec: ClusterSpec, cluster: Any = None) -> None:
        self.client = client
        self.spec = spec
        self.cluster = cluster
        self.last: TaskStats = TaskStats()

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def describe(self) -> str:
        where = (f"local:{self.spec.workers}" if self.spec.kind == "local"
                 else str(self.spec.address))
        return f"{self.n_workers} Dask workers ({where})"

    def on_workers(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        """``fn(*args)`` once in every worker process: {worker address: result}."""
        return self.client.run(fn, *args)

    def map_shards(self, fn: Callable[..., dict[str, Any]], args: Sequence[tuple[Any, ...]],
                   names: Sequence[str], desc: str, units: Sequence[int] | None = None,
                   on_result: Callable[[int, dict[str, Any]], None] | None = None
                   ) -> list[dict[str, Any]]:
        """Run ``fn(*args[i])`` for every i as Dask tasks and return their results in
        order. ``on_result(i, result)`` runs on the driver as each task finishes (the
        merge). A task whose worker dies is rescheduled by the scheduler; a result with
        an ``"error"`` key (an error the user can fix) is raised here as UserError."""
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        t0 = time.perf_counter()
        futs = [self.client.submit(fn, *a, key=f"blcf-{n}", pure=False, retries=TASK_RETRIES)
                for a, n in zip(args, names)]
        index = {f.key: i for i, f in enumerate(futs)}
        results: list[dict[str, Any] | None] = [None] * len(futs)
        total = sum(units) if units is not None else len(futs)
        stats = TaskStats(n_tasks=len(futs), n_workers=max(1, self.n_workers))
        try:
            with tqdm(total=total, desc=desc, unit="img" if units is not None else "task",
                      smoothing=0.05) as bar:
                for fut in as_completed(futs):
                    i = index[fut.key]
                    try:
                        r = fut.result()
                    except KilledWorker as e:
                        raise UserError(f"cluster: task {names[i]} killed {ALLOWED_FAILURES} "
                                        f"workers in a row ({e}); see the workers' logs") from None
                    if "error" in r:
                        raise UserError(str(r["error"]))
                    results[i] = r
                    stats.busy_s += float(r.get("task_s", 0.0))
                    stats.per_task.append({"name": names[i], **{k: v for k, v in r.items()
                                                                 if k.endswith("_s")}})
                    if on_result is not None:
                        on_result(i, r)
                    bar.update(units[i] if units is not None else 1)
        finally:
            for f in futs:
                f.release()
        stats.wall_s = time.perf_counter() - t0
        self.last = stats
        return [r for r in results if r is not None]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()


def _import_dask() -> tuple[Any, Any]:
    try:
        import dask
        import distributed
    except ImportError:
        raise UserError(f"settings key 'cluster' needs dask.distributed, which is not "
                        f"installed; {_INSTALL_HINT}, or set cluster = none") from None
    return dask, distributed


@contextlib.contextmanager
def open_engine(settings: Mapping[str, Any]) -> Iterator[Engine | None]:
    """The engine for ``settings["cluster"]``: None for ``none`` (dask is not imported),
    else a client to a new LocalCluster or to the given scheduler, closed on exit."""
    spec = parse_cluster(settings["cluster"])
    if spec.kind == "none":
        yield None
        return
    dask, distributed = _import_dask()
    # decode workers (DataLoader processes) need a worker that may have children; one
    # task per worker (the network's threads are set per task, see shards.py)
    config = {"distributed.worker.daemon": False,
              "distributed.scheduler.allowed-failures": ALLOWED_FAILURES}
    cluster = None
    quiet = logging.getLogger("distributed")
    level = quiet.level
    if spec.kind == "local":  # the scheduler and nannies live in this process
        quiet.setLevel(logging.WARNING)
    with dask.config.set(config):
        try:
            if spec.kind == "local":
                cluster = distributed.LocalCluster(
                    n_workers=spec.workers, threads_per_worker=1, processes=True,
                    dashboard_address=":0", silence_logs=logging.WARNING,
                    env={"TQDM_DISABLE": "1"})
                client = distributed.Client(cluster)
            else:
                client = distributed.Client(spec.address, timeout=60)
        except OSError as e:
            if cluster is not None:
                cluster.close()
            raise UserError(f"settings key 'cluster': cannot reach {settings['cluster']} "
                            f"({e})") from None
        engine = Engine(client, spec, cluster)
        try:
            if engine.n_workers == 0:
                client.wait_for_workers(1, timeout=120)
            log.info("cluster: %s", engine.describe())
            yield engine
        finally:
            engine.close()
            quiet.setLevel(level)


class LazyEngine:
    """Starts the engine on first use, so a step with nothing to distribute (a rerun)
    pays no cluster start-up."""

    def __init__(self, settings: Mapping[str, Any], stack: contextlib.ExitStack) -> None:
        self.settings = settings
        self.stack = stack
        self._engine: Engine | None = None
        self.enabled = parse_cluster(settings["cluster"]).kind != "none"

    def get(self) -> Engine:
        if self._engine is None:
            engine = self.stack.enter_context(open_engine(self.settings))
            assert engine is not None
            self._engine = engine
        return self._engine
