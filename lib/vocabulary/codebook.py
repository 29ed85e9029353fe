"""The visual vocabulary: k-means training and nearest-word assignment.

Why our own Lloyd loop around FAISS instead of ``faiss.Kmeans``: one loop serves the
three assignment back-ends (FAISS brute force on the CPU, a torch matrix product on
CUDA, and the approximate search that stands in for the original's VLFeat ANN k-means),
reports progress with an ETA, and updates the centroids
deterministically (sorted segment sums accumulated in float64), so a fixed seed gives
the same codebook bit for bit on the CPU. Initialisation is FAISS's and VLFeat's
``random``: ``k`` distinct training points drawn with the seed. Empty clusters are
re-seeded by splitting the largest one (FAISS's rule, made deterministic).

Why a tolerance: on small or easy sets the objective stops moving long before the
iteration cap, and every further iteration costs as much as the first. The loop stops
once an iteration lowers the objective by less than ``tol`` of its previous value; the
test compares two numbers the loop computes anyway, in a fixed order, so the same seed
still stops at the same iteration and gives the same codebook.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from lib.artefacts import load_npy, read_json, save_npy_atomic, sidecar, write_json_atomic
from lib.errors import UserError

log = logging.getLogger(__name__)

MODES = ("exact", "approximate")
_CHUNK = 32768  # query rows per assignment call (bounds the distance block)
_SPLIT_EPS = 1.0 / 1024.0  # relative perturbation when splitting a cluster (as FAISS)

# The approximate search: a 4-bit product quantiser over the centroids (FAISS fast scan,
# PQ_DSUB dimensions per sub-quantiser) shortlists ``n_candidates`` words per feature and
# the shortlist is re-ranked by exact distance (IndexRefineFlat). PQ_DSUB = 8 from 256-D
# up; smaller features get 4-, 2- or 1-D sub-quantisers so that there are at least 32
# (a coarser code shortlists badly). Why not HNSW (used
# before): whitened conv features are close to isotropic, so a graph must compute a few
# hundred full-dimension distances per feature to find the nearest word reliably, which
# is not much cheaper than blocked brute force; the fast scan instead reads 32 bytes of
# code per word and looks distances up in SIMD-register tables, and only the short list
# pays full distances. benchmarks/bench_assignment.py compares the three (figures in
# benchmarks/README.md).
PQ_DSUB = 8
PQ_MIN_M = 32
# FAISS fast-scan query blocking (qbs: how queries are grouped to share each pass over
# the codes). 0x33 was the fastest setting timed in rotation by bench_assignment.py
# --query-blocks (a 25,000-word 512-D codebook of real features), for step C's batches
# and for one query image's features alike, on one and two threads; the 65,536-word
# SMVS codebook's query searches got faster with it too (benchmarks/README.md). The
# words found are the same with any setting.
PQ_QUERY_BLOCKS = 0x33
APPROX_MIN_K = 1024  # below this brute force costs as little: approximate = exact
DEFAULT_CANDIDATES = 64  # Codebook.assign before tune() picks one for the data at hand
KMEANS_CANDIDATES = 16  # k-means tolerates rough assignments (VLFeat's ANN k-means too)
CANDIDATE_LADDER = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)

Assigner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # x -> (word, sq. dist)


@contextlib.contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _pad(x: np.ndarray, d_pad: int) -> np.ndarray:
    """Zero columns up to ``d_pad`` dimensions (L2 distances are unchanged)."""
    x = np.ascontiguousarray(x, np.float32)
    if x.shape[1] == d_pad:
        return x
    out = np.zeros((x.shape[0], d_pad), np.float32)
    out[:, :x.shape[1]] = x
    return out


def pq_layout(dim: int) -> tuple[int, int]:
    """(padded dimension, sub-quantisers) of the shortlist's product quantiser."""
    dsub = PQ_DSUB
    while dsub > 1 and dim // dsub < PQ_MIN_M:
        dsub //= 2
    d_pad = -(-dim // dsub) * dsub
    return d_pad, d_pad // dsub


def build_shortlist_index(centroids: np.ndarray, n_candidates: int
                          ) -> tuple[faiss.IndexRefineFlat, faiss.IndexPQFastScan]:
    """PQ fast-scan shortlist + exact re-ranking over the centroids (dimensions padded
    with zeros to a multiple of the sub-quantiser size, :func:`pq_layout`). The
    quantiser is trained on the centroids themselves, on one thread with a fixed seed,
    so the same codebook always gives the same index and the same words. Returns
    (refine index, its PQ base): the caller keeps both alive (the refine index does not
    own its base)."""
    c = np.ascontiguousarray(centroids, np.float32)
    d_pad, m = pq_layout(c.shape[1])
    cp = _pad(c, d_pad)
    base = faiss.IndexPQFastScan(d_pad, m, 4)
    base.qbs = PQ_QUERY_BLOCKS
    base.pq.cp.seed = 1234
    with _faiss_threads(1):
        base.train(cp)
    idx = faiss.IndexRefineFlat(base)
    idx.add(cp)
    idx.k_factor = float(n_candidates)
    return idx, base


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable (FAISS GPU or torch CUDA), else ``cpu``."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device '{device}': expected auto, cpu or cuda")
    has_cuda = _faiss_gpus() > 0 or _torch_cuda()
    if device == "cuda" and not has_cuda:
        raise UserError("settings key 'device' is 'cuda' but no CUDA GPU is usable here")
    return "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"


def _faiss_gpus() -> int:
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


def _torch_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch missing or broken driver
        return False


# --------------------------------------------------------------------------- assigners


def _chunked(search: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
             x: np.ndarray, bar: tqdm | None = None) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    words = np.empty(n, np.int64)
    dist = np.empty(n, np.float32)
    for s in range(0, n, _CHUNK):
        d, i = search(np.ascontiguousarray(x[s:s + _CHUNK], np.float32))
        words[s:s + len(i)], dist[s:s + len(i)] = i, d
        if bar is not None:
            bar.update(len(i))
    return words, dist


def _faiss_search(index: faiss.Index) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, i = index.search(q, 1)
        return d[:, 0], i[:, 0]

    search.index = index  # type: ignore[attr-defined]  # for k-nearest searches
    return search


def _torch_search(centroids: np.ndarray, tf32: bool) -> Callable[[np.ndarray],
                                                                 tuple[np.ndarray, np.ndarray]]:
    """Brute force on CUDA: ||c||^2 - 2 x.c, argmin (UNTESTED here: no GPU in CI)."""
    import torch

    c = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).cuda()
    c_sq = (c * c).sum(1)

    def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            xq = torch.from_numpy(q).cuda(non_blocking=True)
            d = c_sq[None, :] - 2.0 * (xq @ c.T)
            dmin, imin = d.min(dim=1)
            dmin = dmin + (xq * xq).sum(1)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        return dmin.clamp_min_(0).cpu().numpy(), imin.cpu().numpy()

    return search


def _shortlist_search(built: tuple[faiss.IndexRefineFlat, faiss.IndexPQFastScan]
                      ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    idx, base = built
    inner = _faiss_search(idx)
    d_pad = idx.d

    def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return inner(_pad(q, d_pad))

    search.index = idx  # type: ignore[attr-defined]
    search.base = base  # type: ignore[attr-defined]
    return search


def _make_search(centroids: np.ndarray, mode: str, device: str, n_candidates: int,
                 tf32: bool = False
                 ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    centroids = np.ascontiguousarray(centroids, np.float32)
    if mode == "approximate" and centroids.shape[0] >= APPROX_MIN_K:
        return _shortlist_search(build_shortlist_index(centroids, n_candidates))
    if device == "cuda":
        if _faiss_gpus() > 0:  # pragma: no cover - needs faiss-gpu
            res = faiss.StandardGpuResources()
            gidx = faiss.GpuIndexFlatL2(res, centroids.shape[1])
            gidx.add(centroids)
            search = _faiss_search(gidx)
            search.keepalive = (res, gidx)  # type: ignore[attr-defined]
            return search
        return _torch_search(centroids, tf32)  # pragma: no cover - needs CUDA
    idx = faiss.IndexFlatL2(centroids.shape[1])
    idx.add(centroids)
    return _faiss_search(idx)


# --------------------------------------------------------------------------- k-means


def _centroid_sums(x: np.ndarray, words: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-word sums (float64) and counts, in a fixed order (sorted by word, stable)."""
    counts = np.bincount(words, minlength=k).astype(np.int64)
    order = np.argsort(words, kind="stable")
    sums = np.zeros((k, x.shape[1]), np.float64)
    for s in range(0, len(order), _CHUNK):
        o = order[s:s + _CHUNK]
        w = words[o]
        starts = np.concatenate(([0], np.flatnonzero(np.diff(w)) + 1))
        part = np.add.reduceat(np.asarray(x[o], np.float64), starts, axis=0)
        sums[w[starts]] += part  # words within one chunk are unique per segment
    return sums, counts


def _keep_better_previous(x: np.ndarray, cent: np.ndarray, prev: np.ndarray,
                          words: np.ndarray, dist: np.ndarray) -> None:
    """VLFeat's ANN k-means rule: a point keeps its previous centre when the approximate
    search found nothing closer (so an iteration never increases a point's distance)."""
    for s in range(0, len(x), _CHUNK):
        xb, pb = x[s:s + _CHUNK], prev[s:s + _CHUNK]
        diff = xb - cent[pb]
        d_prev = np.einsum("ij,ij->i", diff, diff)
        better = d_prev < dist[s:s + _CHUNK]
        words[s:s + _CHUNK][better] = pb[better]
        dist[s:s + _CHUNK][better] = d_prev[better]


def _split_empty(cent: np.ndarray, counts: np.ndarray) -> int:
    """Re-seed each empty cluster from the currently largest one (in place)."""
    empty = np.flatnonzero(counts == 0)
    sign = np.where(np.arange(cent.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for ci in empty:
        cj = int(np.argmax(counts))
        if counts[cj] < 2:
            break
        cent[ci] = cent[cj] * (1 + _SPLIT_EPS * sign)
        cent[cj] = cent[cj] * (1 - _SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empty)


def _torch_lloyd_step(x: np.ndarray, k: int, bar: tqdm
                      ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, float]]:
    """One Lloyd iteration on CUDA with the data resident on the GPU: tf32 matrix
    product, argmin, ``index_add_`` of the members (UNTESTED here: no GPU in CI). Atomic
    float additions make GPU codebooks reproducible only up to rounding."""
    import torch

    xt = torch.from_numpy(x).cuda()
    x_sq = (xt * xt).sum(1)
    n, dim = x.shape

    def step(cent: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        c = torch.from_numpy(np.ascontiguousarray(cent)).cuda()
        c_sq = (c * c).sum(1)
        sums = torch.zeros((k, dim), dtype=torch.float32, device=c.device)
        counts = torch.zeros(k, dtype=torch.int64, device=c.device)
        obj = torch.zeros((), dtype=torch.float64, device=c.device)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            for s in range(0, n, _CHUNK):
                xb = xt[s:s + _CHUNK]
                dmin, a = (c_sq[None, :] - 2.0 * (xb @ c.T)).min(dim=1)
                obj += (dmin + x_sq[s:s + _CHUNK]).clamp_min(0).double().sum()
                sums.index_add_(0, a, xb)
                counts += torch.bincount(a, minlength=k)
                bar.update(len(xb))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        return sums.double().cpu().numpy(), counts.cpu().numpy(), float(obj.item())

    return step


@dataclass(frozen=True)
class KMeansResult:
    """What :func:`train_kmeans` made: the words and how they were trained (step B
    records the statistics in the codebook's metadata)."""

    centroids: np.ndarray  # (k, D) float32
    objective: float  # sum of squared distances at the last iteration's assignment
    seconds: float
    device: str
    empty_clusters_split: int
    n_train: int
    niter: int  # iterations run
    stop: str = "max_iter"  # "converged" (tolerance reached) or "max_iter"


def converged(previous: float, objective: float, tol: float) -> bool:
    """Whether an iteration that took the objective from ``previous`` to ``objective``
    lowered it by less than ``tol`` of ``previous`` (an increase counts as converged:
    only the approximate search can cause one, and it means no further progress)."""
    if tol <= 0 or not np.isfinite(previous):
        return False
    return previous - objective < tol * abs(previous)


def train_kmeans(x: np.ndarray, k: int, niter: int, seed: int, mode: str = "exact",
                 device: str = "auto", tol: float = 0.0) -> KMeansResult:
    """Lloyd's k-means on the rows of ``x``: (k, D) float32 centroids and statistics.

    ``mode='exact'``: brute-force assignment (FAISS ``IndexFlatL2`` on the CPU; on CUDA
    FAISS-GPU when installed, else a torch tf32 matrix product). ``'approximate'``: the
    PQ fast-scan shortlist of :data:`KMEANS_CANDIDATES` words re-ranked exactly, rebuilt
    over the current centroids every iteration (CPU), and a point keeps its previous
    word when the shortlist found nothing closer. At most ``niter`` iterations; with
    ``tol > 0`` the loop stops earlier once an iteration lowers the objective by less
    than ``tol`` of its previous value (:func:`converged`). Progress, ETA and the
    objective go to a tqdm bar, each iteration to the debug log; the final objective is
    logged and returned."""
    if mode not in MODES:
        raise UserError(f"kmeans mode '{mode}': expected one of {', '.join(MODES)}")
    if x.ndim != 2:
        raise ValueError(f"expected (n, D) features, got shape {x.shape}")
    n, dim = x.shape
    if k < 1 or k > n:
        raise UserError(f"n_centers = {k} exceeds the number of training features ({n}); "
                        "lower n_centers or raise n_samples / use more images")
    if niter < 1:
        raise UserError(f"kmeans_iter = {niter}: need at least one iteration")
    dev = "cpu" if mode == "approximate" else resolve_device(device)
    x = np.ascontiguousarray(x, np.float32)
    rng = np.random.default_rng(seed)
    cent = x[np.sort(rng.choice(n, size=k, replace=False))].copy()
    t0 = time.perf_counter()
    objective = float("nan")
    n_split = 0
    stop = "max_iter"
    done = 0
    bar = tqdm(total=niter * n, unit="feat", unit_scale=True, desc=f"B k-means k={k}",
               mininterval=1.0, disable=None, leave=False)
    prev: np.ndarray | None = None
    previous = float("nan")  # the objective of the iteration before
    gpu_step = _torch_lloyd_step(x, k, bar) if dev == "cuda" and _faiss_gpus() == 0 else None
    try:
        for it in range(niter):
            if gpu_step is not None:  # pragma: no cover - needs CUDA
                sums, counts, objective = gpu_step(cent)
            else:
                search = _make_search(cent, mode, dev, KMEANS_CANDIDATES, tf32=True)
                words, dist = _chunked(search, x, bar)
                if mode == "approximate" and prev is not None:
                    _keep_better_previous(x, cent, prev, words, dist)
                prev = words
                objective = float(dist.astype(np.float64).sum())
                sums, counts = _centroid_sums(x, words, k)
            nz = counts > 0
            cent = cent.copy()
            cent[nz] = (sums[nz] / counts[nz, None]).astype(np.float32)
            n_split += _split_empty(cent, counts)
            done = it + 1
            bar.set_postfix(it=f"{done}/{niter}", obj=f"{objective:.6g}")
            el = time.perf_counter() - t0
            log.debug("k-means iteration %d/%d: objective %.6g, %.1f s elapsed", done, niter,
                      objective, el)
            if converged(previous, objective, tol):
                stop = "converged"
                break
            previous = objective
    finally:
        bar.close()
    secs = time.perf_counter() - t0
    log.info("k-means %s (%s): %d x %d -> %d words, %d iterations (%s) in %.1f s, "
             "objective %.6g", mode, dev, n, dim, k, done, stop, secs, objective)
    return KMeansResult(cent, objective, round(secs, 2), dev, int(n_split), int(n), int(done),
                        stop)


def kmeans_objective(x: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances of ``x`` to their exact nearest centroid."""
    _, dist = _chunked(_make_search(centroids, "exact", "cpu", 0), x)
    return float(dist.astype(np.float64).sum())


# --------------------------------------------------------------------------- codebook


class Codebook:
    """K visual words and nearest-word assignment (exact, or the PQ fast-scan shortlist
    re-ranked exactly; ``n_candidates`` = shortlist length, set by :meth:`tune`)."""

    def __init__(self, centroids: np.ndarray, mode: str = "exact",
                 meta: dict[str, Any] | None = None, device: str = "cpu") -> None:
        if mode not in MODES:
            raise UserError(f"assignment mode '{mode}': expected one of {', '.join(MODES)}")
        c = np.asarray(centroids)
        if c.ndim != 2 or c.shape[0] < 1:
            raise ValueError(f"centroids must be (K, D), got shape {c.shape}")
        self.centroids = np.ascontiguousarray(c, np.float32)
        self.mode = mode
        self.meta: dict[str, Any] = dict(meta or {})
        self.device = "cpu" if mode == "approximate" else resolve_device(device)
        self.n_candidates = DEFAULT_CANDIDATES
        self._exact: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
        self._shortlist: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def _approximate(self) -> bool:
        """Whether the shortlist answers (approximate mode, at least APPROX_MIN_K words)."""
        return self.mode == "approximate" and self.k >= APPROX_MIN_K

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def _exact_search(self) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
        if self._exact is None:
            self._exact = _make_search(self.centroids, "exact", self.device, 0)
        return self._exact

    def _searcher(self) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
        if not self._approximate:
            return self._exact_search()
        if self._shortlist is None:
            self._shortlist = _make_search(self.centroids, "approximate", "cpu",
                                           self.n_candidates)
        self._shortlist.index.k_factor = float(self.n_candidates)  # type: ignore[attr-defined]
        return self._shortlist

    def assign(self, x: np.ndarray) -> np.ndarray:
        """Nearest word (int64) of each row of ``x`` (n, D)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(f"codebook of {self.dim}-D words cannot assign features of "
                            f"shape {x.shape} (PCA and codebook from different runs?)")
        if x.shape[0] == 0:
            return np.zeros(0, np.int64)
        return _chunked(self._searcher(), x)[0]

    def nearest(self, x: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` nearest words of each row of ``x``, (n, k) int64, nearest first
        (ASMK's query multiple assignment): exact search, or in approximate mode the best
        ``k`` of a shortlist of ``k * n_candidates`` words re-ranked exactly (the shortlist
        tuned for one word, for each of the ``k``)."""
        x = np.ascontiguousarray(x, np.float32)
        k = int(k)
        if x.ndim != 2 or x.shape[1] != self.dim or not 1 <= k <= self.k:
            raise UserError(f"codebook of {self.k} {self.dim}-D words cannot give {k} "
                            f"nearest words of features of shape {x.shape}")
        index = getattr(self._searcher(), "index", None)
        if index is None:  # the torch CUDA search: a flat index on the CPU
            index = faiss.IndexFlatL2(self.dim)
            index.add(self.centroids)
        out = np.empty((len(x), k), np.int64)
        if self._approximate:
            x = _pad(x, index.d)
        for s in range(0, len(x), _CHUNK):
            out[s:s + _CHUNK] = index.search(x[s:s + _CHUNK], k)[1]
        return out

    def exact_assign(self, x: np.ndarray) -> np.ndarray:
        """Brute-force nearest word, whatever the mode (reference for agreement)."""
        return _chunked(self._exact_search(), np.asarray(x, np.float32))[0]

    def tune(self, sample: np.ndarray, target: float = 0.97) -> float:
        """Approximate mode: the shortest shortlist on :data:`CANDIDATE_LADDER` whose
        assignments agree with exact search on ``target`` of ``sample``; returns the
        agreement reached (1.0 in exact mode)."""
        if self.mode == "exact" or len(sample) == 0:
            return 1.0
        ref = self.exact_assign(sample)
        agree = 0.0
        for n in CANDIDATE_LADDER:
            self.n_candidates = n
            agree = float(np.mean(self.assign(sample) == ref))
            if agree >= target:
                break
        log.info("approximate search with %d candidates: agreement with exact %.4f on %d "
                 "features", self.n_candidates, agree, len(sample))
        return agree

    # ------------------------------------------------------------------ I/O

    def content_hash(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.centroids, "<f4").tobytes()
                              ).hexdigest()[:16]

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """``path`` (.npy float32 K x D) + ``<stem>.json``, both atomic, sidecar last. The
        sidecar records the words' content hash and shape, and :meth:`load` checks them:
        a kill between the two renames (new words, the previous run's sidecar) is refused
        on load as a mismatched pair, never used."""
        path = Path(path)
        self.meta = {**meta, "codebook_hash": self.content_hash(), "n_centers": self.k,
                     "dim": self.dim}
        save_npy_atomic(path, self.centroids)
        write_json_atomic(sidecar(path), self.meta)

    @classmethod
    def load(cls, path: Path, mode: str = "exact", device: str = "cpu") -> Codebook:
        """The words of ``path``, checked against their sidecar: float32, (n_centers, dim),
        finite, and the recorded ``codebook_hash``; any mismatch is a UserError naming
        the file (a codebook cut short, transposed, permuted, edited, or half of an
        interrupted write)."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: codebook not found (run step B with TRAIN_CENTROIDS "
                            "true)")
        c = load_npy(path)
        meta = read_json(sidecar(path), "codebook metadata")
        hint = "rerun step B with TRAIN_CENTROIDS true"
        if not isinstance(meta, dict):
            raise UserError(f"{sidecar(path)}: codebook metadata is not a JSON object; {hint}")
        if c.ndim != 2 or c.dtype != np.float32:
            raise UserError(f"{path}: expected a (K, D) float32 array, got {c.dtype} "
                            f"{c.shape}; {hint}")
        shape = (meta.get("n_centers"), meta.get("dim"))
        if any(r is not None and r != n for r, n in zip(shape, c.shape, strict=True)):
            raise UserError(f"{path}: holds {c.shape[0]} x {c.shape[1]} words but its "
                            f"metadata {sidecar(path).name} records {shape[0]} x {shape[1]} "
                            f"(another run's or an interrupted write?); {hint}")
        if not np.isfinite(c).all():
            raise UserError(f"{path}: the words contain NaN or infinite values; {hint}")
        cb = cls(c, mode, meta, device)
        recorded = meta.get("codebook_hash")
        if recorded is None:
            raise UserError(f"{sidecar(path)}: no 'codebook_hash' in the codebook metadata; "
                            f"{hint}")
        if recorded != cb.content_hash():
            raise UserError(f"{path}: the words do not match the 'codebook_hash' recorded in "
                            f"{sidecar(path).name} (another run's, edited, or an interrupted "
                            f"write); {hint}")
        return cb
