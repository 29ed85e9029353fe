#!/usr/bin/env python
"""Automatic cleaning of a noisy class-labelled training list (the recipe of Gordo et al.,
"Deep Image Retrieval", for the Landmarks set), before T_train_triplet trains on it.

Why: web-collected classes hold many images that do not show the class's object;
training a triplet network on them teaches it wrong positives. Within each class:

1. local features: the tapped CNN layer of the chosen backbone (default EfficientNet-Lite0
   ``s6_expand``, stride 16), every map cell, L2-normalised; the cell centre (in cells)
   is its position;
2. every pair of images of the class: mutual nearest neighbours with cosine similarity
   >= ``min_sim`` that pass Lowe's ratio test (``ratio``), then RANSAC on an affine
   model (numpy, all hypotheses vectorised); the pair is *verified* when at least
   ``min_inliers`` matches agree within ``inlier_cells`` map cells;
3. the match graph (images = nodes, verified pairs = edges): keep the largest connected
   component; drop the class when that component has fewer than ``min_class_size``
   images.

Defaults were tuned on the generated noisy set with seed 0 (benchmarks/bench_cleaning.py
reports on other seeds and on SMVS photos) for Lite0 ``s6_expand`` at 320x240 (about
20x15 = 300 cells per image); ``min_inliers`` scales with the number of cells.

Output: the cleaned list (same format as the input, :mod:`lib.learned.training_data`) and a
report ``<OUT_JSON stem>.report.json``: per class the component sizes and per removed
image the reason and its best inlier count with any class mate.

Usage: ``datasets/clean_noisy.py IN_JSON OUT_JSON [--network ... --layer ... --size H W]``
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.artefacts import write_json_atomic
from lib.errors import UserError
from lib.learned.training_data import TrainingSet, read_training_json, write_training_json

log = logging.getLogger(__name__)

LocalFeatures = tuple[np.ndarray, np.ndarray]  # (n, D) L2-normalised, (n, 2) x, y in cells


@dataclass
class CleanConfig:
    min_sim: float = 0.5  # cosine similarity a mutual-NN match needs
    inlier_cells: float = 1.0  # RANSAC inlier threshold, in map cells of the second image
    min_inliers: int = 10  # matches a verified pair needs
    ratio: float = 0.95  # nearest / second-nearest distance ratio a match needs (Lowe)
    ransac_iters: int = 256
    min_class_size: int = 3  # a class keeps its largest component only if this big
    max_scale: float = 4.0  # reject affinities that scale an axis beyond 1/s..s
    seed: int = 0


# --------------------------------------------------------------------------- matching


def mutual_matches(fa: np.ndarray, fb: np.ndarray, min_sim: float,
                   ratio: float = 1.0) -> np.ndarray:
    """(k, 2) index pairs (i in a, j in b) that are each other's nearest neighbour with
    cosine similarity >= ``min_sim`` (rows are L2-normalised) and, for ``ratio`` < 1, a
    Euclidean distance at most ``ratio`` times that to i's second-nearest neighbour in b
    (dense CNN cells of flat background match many cells equally well: the ratio test
    drops those ambiguous matches)."""
    if not len(fa) or not len(fb):
        return np.zeros((0, 2), np.int64)
    sim = fa @ fb.T
    ab = sim.argmax(axis=1)
    ba = sim.argmax(axis=0)
    i = np.flatnonzero(ba[ab] == np.arange(len(fa)))
    j = ab[i]
    good = sim[i, j] >= min_sim
    if ratio < 1.0 and fb.shape[0] > 1:
        s2 = np.partition(sim[i], -2, axis=1)[:, -2]
        d1 = np.sqrt(np.maximum(2.0 - 2.0 * sim[i, j], 0.0))
        d2 = np.sqrt(np.maximum(2.0 - 2.0 * s2, 0.0))
        good &= d1 <= ratio * d2
    return np.stack([i[good], j[good]], axis=1)


def _affine_from_triples(pa: np.ndarray, pb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched exact affinities from point triples: pa, pb (R, 3, 2) -> (R, 2, 3), ok."""
    X = np.concatenate([pa, np.ones((*pa.shape[:2], 1))], axis=2)  # (R, 3, 3)
    det = np.linalg.det(X)
    ok = np.abs(det) > 1e-6
    X[~ok] = np.eye(3)
    A = np.linalg.solve(X, pb).transpose(0, 2, 1)  # (R, 2, 3): pb = X @ A.T
    return A, ok


def _plausible(A: np.ndarray, max_scale: float) -> np.ndarray:
    """Affinities whose singular values lie in [1/max_scale, max_scale] and that keep
    orientation (no mirror images), batched over (R, 2, 3)."""
    s = np.linalg.svd(A[:, :, :2], compute_uv=False)
    det = np.linalg.det(A[:, :, :2])
    return (s[:, 0] <= max_scale) & (s[:, 1] >= 1.0 / max_scale) & (det > 0)


def ransac_affine(pa: np.ndarray, pb: np.ndarray, thresh: float, iters: int,
                  rng: np.random.Generator, max_scale: float = 4.0
                  ) -> tuple[np.ndarray | None, np.ndarray]:
    """Best affine map pa -> pb (2x3) by RANSAC and its inlier mask; all ``iters``
    hypotheses are scored at once. The winner is refit on its inliers (least squares)."""
    k = len(pa)
    none = np.zeros(k, bool)
    if k < 3:
        return None, none
    idx = np.argsort(rng.random((iters, k)), axis=1)[:, :3]
    A, ok = _affine_from_triples(pa[idx], pb[idx])
    ok &= _plausible(A, max_scale)
    if not ok.any():
        return None, none
    A = A[ok]
    P = np.concatenate([pa, np.ones((k, 1))], axis=1)  # (k, 3)
    pred = np.einsum("rij,kj->rki", A, P)  # (R, k, 2)
    inl = np.linalg.norm(pred - pb[None], axis=2) <= thresh
    best = int(inl.sum(axis=1).argmax())
    mask = inl[best]
    if mask.sum() >= 3:
        sol, *_ = np.linalg.lstsq(P[mask], pb[mask], rcond=None)
        A2 = sol.T
        mask2 = np.linalg.norm(P @ A2.T - pb, axis=1) <= thresh
        if mask2.sum() >= mask.sum() and _plausible(A2[None], max_scale)[0]:
            return A2, mask2
    return A[best], mask


def verify_pair(a: LocalFeatures, b: LocalFeatures, cfg: CleanConfig,
                rng: np.random.Generator) -> int:
    """Number of geometrically consistent mutual-NN matches between two images."""
    m = mutual_matches(a[0], b[0], cfg.min_sim, cfg.ratio)
    if len(m) < 3:
        return 0
    _, mask = ransac_affine(a[1][m[:, 0]], b[1][m[:, 1]], cfg.inlier_cells,
                            cfg.ransac_iters, rng, cfg.max_scale)
    return int(mask.sum())


# --------------------------------------------------------------------------- the graph


def largest_component(verified: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest connected component of a symmetric (n, n) boolean
    adjacency; ties go to the component holding the lowest index."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(verified)
    if n == 0:
        return np.zeros(0, bool)
    _, lab = connected_components(csr_matrix(verified), directed=False)
    sizes = np.bincount(lab)
    # bincount order = order of first appearance, so argmax breaks ties by lowest index
    return lab == int(sizes.argmax())


def clean_class(features: Sequence[LocalFeatures], cfg: CleanConfig,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, inlier-count matrix) for the images of one class."""
    n = len(features)
    inl = np.zeros((n, n), np.int32)
    for i in range(n):
        for j in range(i + 1, n):
            inl[i, j] = inl[j, i] = verify_pair(features[i], features[j], cfg, rng)
    keep = largest_component(inl >= cfg.min_inliers)
    if keep.sum() < cfg.min_class_size:
        keep[:] = False
    return keep, inl


def clean_set(ts: TrainingSet, features: Callable[[int], LocalFeatures],
              cfg: CleanConfig) -> tuple[list[int], dict[str, Any]]:
    """Clean every class of ``ts``. ``features(i)`` gives entry i's local features.
    Returns the kept entry indices (input order) and the report."""
    from tqdm import tqdm

    rng = np.random.default_rng(cfg.seed)
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(ts.classes):
        by_class.setdefault(c, []).append(i)
    kept: list[int] = []
    removed: list[dict[str, Any]] = []
    classes: dict[str, Any] = {}
    for c, idx in tqdm(by_class.items(), desc="classes", unit="class"):
        feats = [features(i) for i in idx]
        keep, inl = clean_class(feats, cfg, rng)
        n_keep = int(keep.sum())
        comp = largest_component(inl >= cfg.min_inliers)
        dropped = n_keep == 0
        classes[c] = {"images": len(idx), "kept": n_keep,
                      "largest_component": int(comp.sum()),
                      "verified_pairs": int(np.triu(inl >= cfg.min_inliers, 1).sum()),
                      "dropped": dropped}
        for k, i in enumerate(idx):
            if keep[k]:
                kept.append(i)
                continue
            best = int(np.delete(inl[k], k).max()) if len(idx) > 1 else 0
            reason = (f"class dropped: largest match component has {int(comp.sum())} < "
                      f"{cfg.min_class_size} images" if dropped else
                      "outside the largest match component"
                      f" ({int(comp.sum())} of {len(idx)} images)")
            removed.append({"path": ts.paths[i], "class": c, "reason": reason,
                            "best_inliers": best})
    kept.sort()
    report = {"config": asdict(cfg), "images_in": len(ts), "images_kept": len(kept),
              "classes_in": len(by_class),
              "classes_kept": sum(1 for v in classes.values() if not v["dropped"]),
              "classes": classes, "removed": removed}
    return kept, report


# --------------------------------------------------------------------------- CNN features


def cnn_feature_fn(ts: TrainingSet, network: str, weights: str, layer: str,
                   size_hw: tuple[int, int], device: str = "cpu",
                   weights_file: Path | None = None) -> Callable[[int], LocalFeatures]:
    """``features(i)``: the ``layer`` map of entry i (fixed resize to ``size_hw`` in portrait
    order, landscape images transposed, as step A), L2-normalised cells + positions."""
    import torch

    from lib.features.images import load_image, resize_image
    from lib.features.networks import build_backbone

    bb = build_backbone(network, weights, [layer], weights_file)
    dev = torch.device("cuda" if device == "cuda" or (device == "auto"
                                                      and torch.cuda.is_available()) else "cpu")
    if hasattr(bb, "to"):
        bb.to(dev)
    if hasattr(bb, "eval"):
        bb.eval()

    def features(i: int) -> LocalFeatures:
        img = load_image(ts.file(i))
        h0, w0 = _hw(img)
        hw = size_hw if h0 > w0 else (size_hw[1], size_hw[0])
        x = resize_image(img, hw, True)[None].to(dev)
        with torch.no_grad():
            fmap = bb.forward(bb.preprocess(x))[layer][0].float().cpu().numpy()
        return map_local_features(fmap)

    return features


def _hw(img: Any) -> tuple[int, int]:
    if hasattr(img, "shape"):
        return int(img.shape[-2]), int(img.shape[-1])
    return int(img.size[1]), int(img.size[0])  # PIL


def map_local_features(fmap: np.ndarray) -> LocalFeatures:
    """A (C, h, w) map -> (h*w, C) L2-normalised features (row-major) and their (x, y)
    cell-centre positions; all-zero cells are left out."""
    C, h, w = fmap.shape
    f = fmap.reshape(C, -1).T.astype(np.float32)
    norm = np.linalg.norm(f, axis=1)
    alive = norm > 1e-6
    rr, cc = np.divmod(np.arange(h * w), w)
    xy = np.stack([cc + 0.5, rr + 0.5], axis=1).astype(np.float64)
    return f[alive] / norm[alive, None], xy[alive]


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    from lib.cli import run_main, setup_logging
    from lib.settings import NETWORKS

    p = argparse.ArgumentParser(prog="datasets/clean_noisy.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_json", type=Path, help="noisy training list {root, images: "
                   "[{path, class}]} (lib/learned/training_data.py)")
    p.add_argument("out_json", type=Path, help="cleaned list (same format); the report goes "
                   "to <OUT_JSON stem>.report.json next to it")
    p.add_argument("--network", default="efficientnet_lite0", choices=NETWORKS)
    p.add_argument("--weights", default="default",
                   help="weight family as in the settings key 'weights' (default: default)")
    p.add_argument("--weights-file", type=Path, default=None,
                   help="with --weights file: a converted .pth or a T_train_triplet checkpoint")
    p.add_argument("--layer", default="s6_expand", help="tapped layer (default s6_expand)")
    p.add_argument("--size", type=int, nargs=2, default=[320, 240], metavar=("H", "W"),
                   help="network input in portrait order (default 320 240)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    d = CleanConfig()
    p.add_argument("--min-sim", type=float, default=d.min_sim,
                   help=f"cosine similarity of a mutual-NN match (default {d.min_sim})")
    p.add_argument("--inlier-cells", type=float, default=d.inlier_cells,
                   help=f"RANSAC threshold in map cells (default {d.inlier_cells})")
    p.add_argument("--min-inliers", type=int, default=d.min_inliers,
                   help=f"inliers for a verified pair (default {d.min_inliers})")
    p.add_argument("--ratio", type=float, default=d.ratio,
                   help=f"nearest/second-nearest distance ratio (default {d.ratio}; 1 = off)")
    p.add_argument("--min-class-size", type=int, default=d.min_class_size,
                   help=f"drop classes left smaller (default {d.min_class_size})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        if args.out_json.resolve() == args.in_json.resolve():
            raise UserError(f"{args.out_json}: OUT_JSON must differ from IN_JSON")
        t0 = time.perf_counter()
        ts = read_training_json(args.in_json)
        cfg = CleanConfig(args.min_sim, args.inlier_cells, args.min_inliers, args.ratio,
                          min_class_size=args.min_class_size, seed=args.seed)
        fn = cnn_feature_fn(ts, args.network, args.weights, args.layer, tuple(args.size),
                            args.device, args.weights_file)
        kept, report = clean_set(ts, fn, cfg)
        report["features"] = {"network": args.network, "weights": args.weights,
                              "layer": args.layer, "size": list(args.size)}
        report["seconds"] = round(time.perf_counter() - t0, 2)
        if not kept:
            log.warning("every image was removed; see the report for the inlier counts "
                        "(too few map cells for --min-inliers?)")
        write_training_json(args.out_json, ts.subset(kept))
        rep = args.out_json.with_name(args.out_json.stem + ".report.json")
        write_json_atomic(rep, report)
        print(f"cleaned {len(ts)} -> {len(kept)} images, {report['classes_in']} -> "
              f"{report['classes_kept']} classes in {report['seconds']:.1f} s: "
              f"{args.out_json} (report {rep})")
        return 0

    run_main(body, "clean_noisy")


if __name__ == "__main__":
    main()
