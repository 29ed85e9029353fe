"""Local CNN feature extraction: the batched store filler of step A and the single-image
extractor that step D uses for queries.

Why this shape:

* **Decoding in DataLoader workers** (``num_workers``): JPEG decoding, EXIF rotation and
  the resize run in other processes and are prefetched, so the network never waits.
* **Batches grouped by input size** (orientation under ``resize = fixed``): images are
  bucketed by their network input size in database order; a bucket is run when it holds
  ``batch_size`` images, the partial buckets at the end.
* **Exact resume**: bucketing is simulated over the *whole* id list, stored images taking
  their slot (their size comes from the store header, no decoding), and LMDB
  transactions hold whole batches only (the batches finished in the last
  ``COMMIT_EVERY_S`` seconds: one fsync per commit, not per batch). So an interrupted
  run has committed whole batches of the uninterrupted run's plan, and the resumed run
  recomputes exactly the missing batches with the same composition: the store ends
  byte-identical, whatever the backend's batch-size-dependent arithmetic.
* **CUDA** when present (``device``), pinned host memory and non-blocking copies,
  channels-last, optional fp16/bf16 autocast (``precision``; CUDA only).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lib.errors import UserError
from lib.features.images import CorruptImageError, load_image, resize_image, target_size

log = logging.getLogger(__name__)

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
COMMIT_EVERY_S = 2.0  # finished batches are committed together at most this often


_portable_lock = threading.Lock()
_portable_users = 0
_onednn_before = True


@contextmanager
def portable_kernels() -> Iterator[None]:
    """torch's own CPU kernels instead of oneDNN while inside. The switch is process-wide
    in torch, so concurrent users (the search server's threads) share it: it is turned
    off by the first to enter and restored by the last to leave."""
    global _portable_users, _onednn_before
    with _portable_lock:
        if _portable_users == 0:
            _onednn_before = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
        _portable_users += 1
    try:
        yield
    finally:
        with _portable_lock:
            _portable_users -= 1
            if _portable_users == 0:
                torch.backends.mkldnn.enabled = _onednn_before


def pick_device(name: str | None) -> torch.device:
    """``auto``/None: CUDA when present, else CPU; ``cuda`` without CUDA is a UserError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("settings key 'device': 'cuda' asked for but no CUDA device is "
                        "available")
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Extractor:
    """A backbone on a device with the settings' resize rule and precision."""

    def __init__(self, settings: Mapping[str, Any], device: str | None = None,
                 share: Extractor | None = None) -> None:
        """``share``: an extractor whose backbone (same network, weights and layers) this
        one uses under its own resize settings (the extra ``scales`` of a query)."""
        from lib.features.networks import build_backbone

        self.settings = settings
        self.device = pick_device(device or settings["device"])
        self.precision = settings["precision"]
        if self.precision != "fp32" and self.device.type != "cuda":
            raise UserError(f"settings key 'precision': {self.precision!r} needs a CUDA "
                            "device (use fp32 on the CPU)")
        self.layers = list(settings["layers"])
        # oneDNN's CPU convolutions split their work by thread count, so their last bits
        # follow it; torch's own kernels do not (docs/guarantees.md#determinism)
        self.onednn = not (self.device.type == "cpu"
                           and settings["cpu_kernels"] == "portable")
        if share is not None:
            self.backbone = share.backbone
            return
        bb = build_backbone(settings["network"], settings["weights"], self.layers,
                            settings["weights_file"])
        self.backbone = bb.to(self.device, memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def input_size_for(self, width: int, height: int) -> tuple[int, int]:
        """Network input (H, W) for an image of ``width``×``height`` (settings' rule)."""
        s = self.settings
        return target_size(width, height, s["resize"], s["input_size"], s["max_side"])

    def forward(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """uint8 (N, 3, H, W) RGB batch -> {layer: float32 (N, C, h, w)} on the host."""
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), (nullcontext() if self.onednn else portable_kernels()):
            xin = self.backbone.preprocess(x)
            if self.precision in _AUTOCAST:
                with torch.autocast("cuda", dtype=_AUTOCAST[self.precision]):
                    out = self.backbone(xin)
            else:
                out = self.backbone(xin)
            return {k: out[k].float().contiguous().cpu().numpy() for k in self.layers}

    def extract(self, img: Image.Image) -> dict[str, np.ndarray]:
        """{layer: float32 (C, h, w)} of ONE decoded image (the query-side twin of A)."""
        hw = self.input_size_for(img.width, img.height)
        x = resize_image(img, hw, self.settings["antialias"])[None]
        return {k: v[0] for k, v in self.forward(x).items()}


# --------------------------------------------------------------------------- decoding


class _Decode(Dataset):
    """Item i -> (i, uint8 (3, H, W) tensor or None, (H0, W0) or the corrupt reason)."""

    def __init__(self, ids: Sequence[str], paths: Mapping[str, Any], resize: str,
                 input_size: Sequence[int], max_side: int, antialias: bool,
                 max_pixels: int) -> None:
        self.ids = list(ids)
        self.paths = dict(paths)
        self.rule = (resize, list(input_size), int(max_side))
        self.antialias = antialias
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, Any]:
        from lib.groundtruth.loader import image_path

        image_id = self.ids[i]
        try:
            path = image_path(self.paths, image_id)
        except UserError as e:
            return i, None, f"file not found ({e})"
        try:
            img = load_image(path, self.max_pixels)
        except CorruptImageError as e:
            return i, None, str(e).split(": ", 1)[-1]
        hw = target_size(img.width, img.height, *self.rule)
        return i, resize_image(img, hw, self.antialias), (img.height, img.width)


def _init_worker(_: int) -> None:
    """Decode workers: one thread each, and a lower CPU priority, so that on a machine
    without spare cores the forward pass (the bottleneck) is never starved by the
    prefetching it does not need yet."""
    import contextlib
    import os

    torch.set_num_threads(1)
    with contextlib.suppress(OSError, AttributeError):
        os.nice(5)


# --------------------------------------------------------------------------- step A


def store_meta(settings: Any, provenance: Mapping[str, Any], count: int, created: str,
               complete: bool, compute: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from lib.artefacts import library_versions

    return {"provenance": dict(provenance), "layers": list(settings["layers"]),
            "feature_dtype": settings["feature_dtype"], "count": int(count),
            "settings_hash": settings.step_hash("A"), "versions": library_versions(),
            "created": created, "complete": bool(complete),
            "compute": dict(compute) if compute is not None else None}


def compute_record(device: torch.device, cpu_kernels: str = "onednn") -> dict[str, Any]:
    """What the stored maps' bits depend on besides the provenance: the device type and,
    on the CPU with oneDNN kernels, torch's intra-op thread count
    (``torch.get_num_threads()``, set by ``OMP_NUM_THREADS``): oneDNN splits its reductions
    by thread, so one and two threads give EfficientNet-Lite0 maps that differ in the last
    bits. torch's portable kernels (``cpu_kernels = portable``) give the same bits under any
    count, so their record names the kernels instead. Decode workers are processes with
    one thread each (:func:`_init_worker`) and do not count."""
    if device.type != "cpu":
        return {"device": device.type, "threads": None}
    if cpu_kernels == "portable":
        return {"device": "cpu", "threads": None, "kernels": "portable"}
    return {"device": "cpu", "threads": torch.get_num_threads()}


def _describe(compute: Mapping[str, Any]) -> str:
    if compute.get("kernels") == "portable":
        return "on cpu with cpu_kernels = portable"
    if compute.get("threads") is None:
        return f"on {compute.get('device')}"
    return f"on {compute.get('device')} with {compute['threads']} intra-op thread(s)"


def check_compute(recorded: Any, current: Mapping[str, Any], n_stored: int,
                  where: str) -> None:
    """Refuse to add maps computed otherwise than the stored ones (a resume under another
    thread count or device), so that a store never mixes both. A store from before this
    record (``recorded`` None) is not checked."""
    if not isinstance(recorded, Mapping) or dict(recorded) == dict(current):
        return
    if recorded.get("kernels") == "portable":
        fix = "resume with device = cpu and cpu_kernels = portable"
    elif recorded.get("threads") is not None and recorded.get("device") == "cpu":
        fix = f"resume with OMP_NUM_THREADS={recorded['threads']} and cpu_kernels = onednn"
    else:
        fix = f"resume with device = {recorded.get('device')}"
    raise UserError(f"{where}: its {n_stored} stored images were extracted "
                    f"{_describe(recorded)}, this run would extract {_describe(current)}, "
                    f"which gives other numbers; {fix}, or delete the store to extract "
                    "every image anew")


def check_store_meta(meta: Mapping[str, Any], provenance: Mapping[str, Any],
                     settings: Mapping[str, Any], where: str) -> None:
    """Refuse a store whose metadata does not match the settings, naming the field."""
    from lib.artefacts import check_fields

    hint = "delete that store or set path_features to another folder"
    found = meta.get("provenance")
    if not isinstance(found, Mapping):
        raise UserError(f"{where}: metadata field 'provenance' missing; {hint}")
    check_fields(provenance, found, sorted(provenance), where, hint)
    check_fields({"feature_dtype": settings["feature_dtype"]}, meta, ["feature_dtype"],
                 where, hint)


def run_extraction(settings: Any, image_ids: list[str], store_path: Path | None = None,
                   stop_after_batches: int | None = None) -> dict[str, Any]:
    """Fill the feature store with the maps of ``image_ids`` (step A). Stored ids are
    skipped; corrupt images are listed in ``corrupted.txt`` and skipped. Returns counts
    and timings. ``stop_after_batches`` simulates an interruption (tests)."""
    from lib.cluster.engine import open_engine
    from lib.cluster.shards import cluster_compute_record, extract_on_cluster
    from lib.features.feature_store import FeatureStore, write_corrupted
    from lib.features.networks import feature_provenance

    t_start = time.perf_counter()
    path = Path(store_path) if store_path is not None else FeatureStore.path_for(settings)
    prov = feature_provenance(settings)
    if len(set(image_ids)) != len(image_ids):
        raise UserError("image list: duplicate image ids")
    # ids that cannot be a store key are listed with the corrupt images before anything
    # is extracted (they used to fail at the commit of their batch, on every rerun)
    image_ids, bad_ids = split_bad_ids(image_ids)
    fresh = not (path / "data.mdb").is_file()
    store = FeatureStore(path, readonly=False)
    stack = contextlib.ExitStack()  # the Dask client when settings' cluster is not none
    try:
        meta = store.meta
        if not fresh and meta:
            check_store_meta(meta, prov, settings, str(path))
            created = meta.get("created") or _now()
        else:
            created = _now()
        stored = store.sizes()
        stale = refresh_inputs(store, settings, image_ids, stored)
        stored = {i: hw for i, hw in stored.items() if i not in stale}
        todo = [i for i in image_ids if i not in stored]
        # the thread count and device the stored maps were computed with: a resume under
        # others is refused (compute_record), a new or emptied store records this run's
        engine = stack.enter_context(open_engine(settings)) if todo else None
        if engine is not None:  # every worker computes as the store records (shards.py)
            current = cluster_compute_record(engine, settings)
        else:
            current = (compute_record(pick_device(settings["device"]), settings["cpu_kernels"])
                       if todo else None)
        recorded = meta.get("compute") if not fresh and meta else None
        if stored and current is not None:
            check_compute(recorded, current, len(stored), str(path))
        compute = (recorded if isinstance(recorded, Mapping) else None) if stored else current
        store.set_meta(store_meta(settings, prov, len(stored), created, False, compute))
        n_skipped = len(image_ids) - len(todo)
        corrupt: dict[str, str] = dict(bad_ids)  # never stored: always retried
        ext = Extractor(settings) if todo and engine is None else None
        if engine is not None:
            res = extract_on_cluster(engine, settings, store, image_ids, todo, corrupt,
                                     compute or {})
            res["device"] = f"{engine.describe()}, {compute and compute['device']}"
        else:
            res = fill_batches(ext, settings, store, image_ids, stored, todo, corrupt,
                               stop_after_batches)
        write_corrupted(path, corrupt.items())
        n_total = len(store)
        complete = not res["interrupted"]
        store.set_meta(store_meta(settings, prov, n_total, created, complete, compute))
        store.sync()
    finally:
        stack.close()
        store.close()
    wall = time.perf_counter() - t_start
    n_new = len(res["done"])
    return {"store": str(path), "extracted": n_new, "skipped": n_skipped,
            "corrupt": len(corrupt), "count": n_total, "seconds": wall,
            "loop_seconds": res["loop_s"], "forward_seconds": res["forward_s"],
            "wait_seconds": res["wait_s"],
            "images_per_s": n_new / res["loop_s"] if res["loop_s"] > 0 else 0.0,
            "device": res.get("device") or (str(ext.device) if ext else "-"),
            "interrupted": res["interrupted"], "cluster": res.get("cluster")}


def split_bad_ids(image_ids: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(the ids usable as store keys, {other id: why not}): a file name that is not
    UTF-8, an id over LMDB's 511-byte key limit. Each one is logged (with its reason)."""
    from lib.features.feature_store import key_problem, printable_id

    good, bad = [], {}
    for i in image_ids:
        why = key_problem(i)
        if why is None:
            good.append(i)
        else:
            bad[i] = why
            log.warning("skipped %s: %s", printable_id(i), why)
    return good, bad


def refresh_inputs(store: Any, settings: Any, image_ids: Sequence[str],
                   stored: Mapping[str, Any]) -> list[str]:
    """Record the identity (size, mtime) of every image file about to be stored, and
    drop the stored records whose file changed since they were extracted (another
    ``path_images`` with the same names, a rewritten photo), so they are extracted
    again. Recorded before any new record, in the same transaction as the drops, so an
    interrupted run resumes with the right identities. Returns the dropped ids."""
    from lib.features.feature_store import input_key
    from lib.groundtruth.loader import image_path
    from lib.provenance import file_identity

    def ident(i: str) -> tuple[int, int]:
        try:
            f = file_identity(image_path(settings, i))
        except UserError:
            f = None
        return (f[0], f[1]) if f else (-1, -1)

    recorded = store.inputs()
    current = {input_key(i): ident(i) for i in image_ids}
    if recorded is None:  # a store from before this record: its records are trusted
        stale = []
        recorded = {}
    else:
        stale = [i for i in image_ids if i in stored
                 and recorded.get(input_key(i)) != current[input_key(i)]]
    if stale:
        log.warning("%s: %d stored images changed since they were extracted (file size or "
                    "modification time), e.g. %s; extracting them again", store.path,
                    len(stale), ", ".join(stale[:3]))
    store.replace_inputs({**recorded, **current}, drop=stale)
    return stale


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fill_batches(ext: Extractor | None, settings: Any, store: Any, image_ids: list[str],
                 stored: Mapping[str, tuple[int, int]], todo: list[str],
                 corrupt: dict[str, str], stop_after_batches: int | None,
                 desc: str = "A: extracting") -> dict[str, Any]:
    """The bucketing loop (see module doc). ``store`` is any sink with ``put_many``
    (the feature store for step A, the assigning sink of the streaming mode)."""
    done: set[str] = set()
    res = {"done": done, "forward_s": 0.0, "loop_s": 0.0, "wait_s": 0.0, "interrupted": False}
    if not todo or ext is None:
        return res
    paths = {k: settings[k] for k in ("path_images", "path_queries", "path_distractors")}
    ds = _Decode(todo, paths, settings["resize"], settings["input_size"],
                 settings["max_side"], settings["antialias"], settings["max_image_pixels"])
    nw = int(settings["num_workers"])
    cuda = ext.device.type == "cuda"
    bs = max(1, int(settings["batch_size"]))
    # two full batches in flight, whatever the number of workers
    prefetch = max(2, -(-2 * bs // nw)) if nw else None
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=nw,
                        pin_memory=cuda, worker_init_fn=_init_worker if nw else None,
                        prefetch_factor=prefetch)
    buckets: dict[tuple[int, int], list[tuple[str, torch.Tensor | None, Any]]] = {}
    n_batches = 0
    bar = tqdm(total=len(todo), unit="img", desc=desc, smoothing=0.05, leave=False,
               disable=None)
    t0 = time.perf_counter()

    pending: list[tuple[str, dict[str, np.ndarray], Any]] = []
    last_commit = time.perf_counter()

    def commit() -> None:
        """One LMDB transaction for the finished batches (whole batches only), at most
        every COMMIT_EVERY_S: fewer fsyncs, the same resume guarantee."""
        nonlocal last_commit
        if pending:
            store.put_many(pending)
            done.update(i for i, _, _ in pending)
            pending.clear()
        last_commit = time.perf_counter()

    def flush(key: tuple[int, int]) -> None:
        nonlocal n_batches
        entries = buckets.pop(key)
        real = [(i, x, s) for i, x, s in entries if x is not None]
        if not real:
            return
        if stop_after_batches is not None and n_batches >= stop_after_batches:
            res["interrupted"] = True
            raise _StopRequestedError
        x = torch.stack([x for _, x, _ in real])
        if cuda:
            x = x.pin_memory()
        tf = time.perf_counter()
        maps = ext.forward(x)
        res["forward_s"] += time.perf_counter() - tf
        pending.extend((i, {k: v[j] for k, v in maps.items()}, s)
                       for j, (i, _, s) in enumerate(real))
        n_batches += 1
        bar.update(len(real))
        if time.perf_counter() - last_commit >= COMMIT_EVERY_S:
            commit()

    def add(key: tuple[int, int], entry: tuple[str, torch.Tensor | None, Any]) -> None:
        buckets.setdefault(key, []).append(entry)
        if len(buckets[key]) >= bs:
            flush(key)

    it = iter(loader)
    try:
        for image_id in image_ids:
            if image_id in stored:
                h0, w0 = stored[image_id]
                add(ext.input_size_for(w0, h0), (image_id, None, None))
                continue
            tw = time.perf_counter()
            _, x, info = next(it)
            res["wait_s"] += time.perf_counter() - tw
            if x is None:
                corrupt[image_id] = str(info)
                log.warning("skipped %s: %s", image_id, info)
                bar.update(1)
                continue
            add((int(x.shape[1]), int(x.shape[2])), (image_id, x, tuple(info)))
        for key in list(buckets):
            flush(key)
        commit()
    except (_StopRequestedError, KeyboardInterrupt) as e:
        commit()  # keep the finished batches; an interrupted run resumes after them
        if isinstance(e, KeyboardInterrupt):
            raise
    finally:
        bar.close()
        del it
    res["loop_s"] = time.perf_counter() - t0
    return res


class _StopRequestedError(Exception):
    pass
