"""Siamese/triplet fine-tuning of a backbone with an R-MAC head (Gordo et al., "Deep
Image Retrieval", ECCV 2016 / IJCV 2017), for the optional step T_train_triplet.

Why these choices:
* The head is R-MAC (:mod:`lib.learned.rmac` regions, max pool, L2) whose PCA-whitening is a
  learned linear layer, *initialised* from the PCA-whitening of the training images'
  region vectors, so epoch 0 is exactly the untrained R-MAC (+PCA) descriptor.
* Loss: triplet ranking loss ``max(0, margin + |a-p|² - |a-n|²)`` on L2-normalised
  descriptors (Gordo's squared-distance form).
* Hard negatives are re-mined at the start of every epoch from the *current* model's
  descriptors of all training images: for each anchor, the most similar images of
  other classes (:func:`hardest_negatives`); one of the ``neg_pool`` hardest is drawn.
* BatchNorm statistics stay frozen (``eval`` mode): batches of a few triplets would
  otherwise wreck the ImageNet running statistics.
* Checkpoints hold tensors and plain types only, so ``torch.load(..., weights_only=True)``
  reads them; format ``blcf-checkpoint-1`` is shared with step A's loader, which reads
  ``state_dict`` (the backbone's own state dict, same keys as the untrained network).
* Resuming: every random draw of epoch ``e`` comes from ``seed + e``, so a run resumed
  from the checkpoint after epoch ``e`` repeats what the uninterrupted run would do.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib.artefacts import atomic_path
from lib.errors import UserError
from lib.features.extraction import pick_device
from lib.learned.rmac import Transform, affine_of, fit_rmac_pca, rmac_regions

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "blcf-checkpoint-1"


# --------------------------------------------------------------------------- the head


class RMACHead(nn.Module):
    """R-MAC as a differentiable module: regions → max pool → L2 → linear (learned
    PCA-whitening) → L2 → sum → L2. Input (B, C, h, w), output (B, dim)."""

    def __init__(self, channels: int, dim: int, L: int = 3) -> None:
        super().__init__()
        self.L = L
        self.channels = channels
        self.dim = dim
        self.fc = nn.Linear(channels, dim)
        self._grid: dict[tuple[int, int], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}

    def init_from_pca(self, pca: Transform) -> None:
        """Set the linear layer to the PCA-whitening ``pca`` (what R-MAC uses untrained)."""
        W, b = affine_of(pca, self.channels)
        if W.shape != (self.dim, self.channels):
            raise ValueError(f"PCA is {W.shape}, head expects {(self.dim, self.channels)}")
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(W))
            self.fc.bias.copy_(torch.from_numpy(b))

    def _regions(self, h: int, w: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        # grouped by side: one max_pool2d (stride 1) per level, then gather the starts
        if (h, w) not in self._grid:
            reg = rmac_regions(h, w, self.L)
            sides = reg[:, 2] - reg[:, 0]
            self._grid[h, w] = [
                (int(s), torch.from_numpy(reg[sides == s, 0]), torch.from_numpy(reg[sides == s, 1]))
                for s in np.unique(sides)
            ]
        return self._grid[h, w]

    def region_vectors(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, n_regions, C) max-pooled region vectors (not normalised)."""
        out = []
        for s, r0, c0 in self._regions(fmap.shape[2], fmap.shape[3]):
            pooled = F.max_pool2d(fmap, kernel_size=s, stride=1)  # (B, C, h-s+1, w-s+1)
            out.append(pooled[:, :, r0.to(fmap.device), c0.to(fmap.device)])
        return torch.cat(out, dim=2).transpose(1, 2)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        v = F.normalize(self.region_vectors(fmap), dim=-1)
        v = F.normalize(self.fc(v), dim=-1)
        return F.normalize(v.sum(dim=1), dim=-1)


class TappedBackbone(nn.Module):
    """Adapter: a :func:`lib.features.networks.build_backbone` module (forward -> dict of maps)
    reduced to the one map the head pools. ``inner`` is what checkpoints save as
    ``state_dict``, so step A's ``weights = file`` loader sees its own keys."""

    def __init__(self, inner: nn.Module, layer: str) -> None:
        super().__init__()
        self.inner = inner
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[self.layer]


def _saved_backbone(backbone: nn.Module) -> nn.Module:
    return backbone.inner if isinstance(backbone, TappedBackbone) else backbone


class RetrievalNet(nn.Module):
    """Backbone (float image batch → (B, C, h, w) map of the tapped layer) + R-MAC head."""

    def __init__(self, backbone: nn.Module, head: RMACHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True) -> RetrievalNet:
        super().train(mode)
        for m in self.modules():  # frozen BatchNorm statistics (see module docstring)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


# --------------------------------------------------------------------------- loss and mining


def triplet_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """Mean of ``max(0, margin + |a-p|² - |a-n|²)`` over the batch."""
    dp = (a - p).pow(2).sum(dim=1)
    dn = (a - n).pow(2).sum(dim=1)
    return F.relu(margin + dp - dn).mean()


def hardest_negatives(desc: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices: per image, the ``k`` most similar images (dot product) of other
    classes, hardest first; ties break by index. ``-1`` pads when fewer exist."""
    desc = np.asarray(desc, np.float32)
    labels = np.asarray(labels)
    sim = desc @ desc.T
    sim[labels[:, None] == labels[None, :]] = -np.inf
    k = min(k, len(labels))
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    valid = np.isfinite(np.take_along_axis(sim, order, axis=1))
    return np.where(valid, order, -1)


def make_triplets(desc: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                  neg_pool: int = 5) -> np.ndarray:
    """(T, 3) anchor/positive/negative indices: every image with a class mate is an
    anchor once; the positive is a random class mate, the negative a random one of its
    ``neg_pool`` hardest negatives under ``desc``."""
    labels = np.asarray(labels)
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    anchors = np.flatnonzero(same.any(axis=1))
    hard = hardest_negatives(desc, labels, neg_pool)
    if not len(anchors) or np.all(hard[:, 0] < 0):
        raise UserError("training data: need at least one class with 2 images and 2 classes")
    # random class mate: random scores, masked to class mates, argmax
    score = rng.random((len(anchors), n))
    score[~same[anchors]] = -1.0
    pos = score.argmax(axis=1)
    pool = hard[anchors]
    n_valid = (pool >= 0).sum(axis=1)
    pick = np.floor(rng.random(len(anchors)) * n_valid).astype(np.int64)
    neg = pool[np.arange(len(anchors)), pick]
    keep = neg >= 0
    return np.stack([anchors, pos, neg], axis=1)[keep]


# --------------------------------------------------------------------------- batching


def embed(model: nn.Module, images: Sequence[torch.Tensor], preprocess: Callable,
          device: torch.device, batch_size: int = 16, grad: bool = False,
          progress: bool = False) -> torch.Tensor:
    """Descriptors of uint8 (3, H, W) images in input order. Images of equal shape are
    batched together (the fixed resize gives two shapes: portrait and landscape)."""
    from tqdm import tqdm

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    chunks = [idx[j: j + batch_size] for idx in groups.values()
              for j in range(0, len(idx), batch_size)]
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for chunk in tqdm(chunks, desc="descriptors", unit="batch", disable=not progress,
                          leave=False):
            x = torch.stack([images[i] for i in chunk]).to(device)
            d = model(preprocess(x))
            for i, row in zip(chunk, d):
                out[i] = row
    return torch.stack(out)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- checkpoints


@dataclass
class TrainConfig:
    epochs: int = 5
    margin: float = 0.1
    lr: float = 1e-5
    weight_decay: float = 1e-6
    batch_triplets: int = 8
    neg_pool: int = 5
    seed: int = 0
    embed_batch: int = 16


@dataclass
class TrainState:
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _plain(obj: Any) -> Any:
    """JSON-plain copy (str subclasses such as torch's version string, numpy scalars and
    paths become str/int/float): ``weights_only`` loading refuses any other class."""
    import json

    from lib.artefacts import json_default

    return json.loads(json.dumps(obj, default=lambda o: _safe_default(o, json_default)))


def _safe_default(o: Any, fallback: Callable[[Any], Any]) -> Any:
    try:
        return fallback(o)
    except TypeError:
        return str(o)


def save_checkpoint(path: str | Path, model: RetrievalNet, network: str,
                    preprocessing: dict[str, Any], meta: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    state: TrainState | None = None) -> None:
    """Write ``blcf-checkpoint-1`` atomically (tensors + plain types only)."""
    ck = {
        "format": CHECKPOINT_FORMAT,
        "network": network,
        "state_dict": {k: v.detach().cpu()
                       for k, v in _saved_backbone(model.backbone).state_dict().items()},
        "head_state_dict": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        "preprocessing": _plain(preprocessing),
        "meta": _plain(meta),
    }
    if optimizer is not None:
        ck["optimizer_state_dict"] = optimizer.state_dict()
    if state is not None:
        ck["epoch"] = state.epoch
        ck["history"] = _plain(state.history)
    with atomic_path(path) as tmp:
        torch.save(ck, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint with ``weights_only=True`` (no code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle with code, foreign format
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise UserError(f"{path}: field 'format' is {got!r}, expected {CHECKPOINT_FORMAT!r}")
    for key in ("network", "state_dict", "head_state_dict", "preprocessing", "meta"):
        if key not in ck:
            raise UserError(f"{path}: checkpoint field '{key}' missing")
    return ck


def head_from_checkpoint(ck: dict[str, Any]) -> RMACHead:
    """The trained R-MAC head of a checkpoint (D can use it as the learned PCA)."""
    m = ck["meta"]
    head = RMACHead(int(m["channels"]), int(m["dim"]), int(m.get("L", 3)))
    head.load_state_dict(ck["head_state_dict"])
    return head


# --------------------------------------------------------------------------- training


def init_head_pca(model: RetrievalNet, images: Sequence[torch.Tensor], preprocess: Callable,
                  device: torch.device, max_images: int, rng: np.random.Generator) -> None:
    """Fit the head's linear layer as the PCA-whitening of region vectors of (a sample of)
    the training images, with the untrained backbone."""
    sel = np.sort(rng.permutation(len(images))[:max_images])
    vecs = []
    model.to(device).eval()
    from tqdm import tqdm

    with torch.no_grad():
        for j in tqdm(sel, desc="head PCA", unit="img", leave=False):
            fmap = model.backbone(preprocess(images[j][None].to(device)))
            vecs.append(model.head.region_vectors(fmap)[0].cpu().numpy())
    pca = fit_rmac_pca(np.concatenate(vecs), model.head.dim)
    if pca.dim_out < model.head.dim:
        raise UserError(f"training data: {sum(len(v) for v in vecs)} region vectors give "
                        f"only {pca.dim_out} PCA axes; lower 'train_dim' to that")
    model.head.init_from_pca(pca)


def train_triplet(model: RetrievalNet, images: Sequence[torch.Tensor], labels: np.ndarray,
                  preprocess: Callable, cfg: TrainConfig, device: torch.device,
                  save: Callable[[RetrievalNet, torch.optim.Optimizer,
                                                    TrainState], None],
                  resume: dict[str, Any] | None = None,
                  eval_fn: Callable[[RetrievalNet], dict[str, float]] | None = None,
                  ) -> TrainState:
    """Fine-tune ``model`` for ``cfg.epochs`` epochs (total, counting resumed ones); after
    every epoch ``save`` writes the checkpoint. ``resume``: a loaded checkpoint whose
    weights, optimiser state, epoch and history continue here."""
    from tqdm import tqdm

    labels = np.asarray(labels)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = TrainState()
    if resume is not None:
        _saved_backbone(model.backbone).load_state_dict(resume["state_dict"])
        model.head.load_state_dict(resume["head_state_dict"])
        if "optimizer_state_dict" in resume:
            opt.load_state_dict(resume["optimizer_state_dict"])
        state = TrainState(int(resume.get("epoch", 0)), list(resume.get("history", [])))
        log.info("resuming after epoch %d", state.epoch)
    model.to(device)
    if eval_fn is not None and state.epoch == 0 and not state.history:
        model.eval()  # the untrained model's numbers, as epoch 0
        state.history.append({"epoch": 0, **eval_fn(model)})
    for epoch in range(state.epoch, cfg.epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout / drop-connect, if any
        model.eval()
        desc = embed(model, images, preprocess, device, cfg.embed_batch, progress=True)
        trip = make_triplets(desc.cpu().numpy(), labels, rng, cfg.neg_pool)
        trip = trip[rng.permutation(len(trip))]
        t_mine = time.perf_counter() - t0
        model.train()
        losses, active = [], 0
        n_batches = math.ceil(len(trip) / cfg.batch_triplets)
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
        for b in bar:
            t = trip[b * cfg.batch_triplets: (b + 1) * cfg.batch_triplets]
            flat = t.reshape(-1)
            d = embed(model, [images[i] for i in flat], preprocess, device,
                      batch_size=len(flat), grad=True).reshape(len(t), 3, -1)
            loss = triplet_loss(d[:, 0], d[:, 1], d[:, 2], cfg.margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            with torch.no_grad():
                active += int(((d[:, 0] - d[:, 1]).pow(2).sum(1) + cfg.margin
                               > (d[:, 0] - d[:, 2]).pow(2).sum(1)).sum())
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        state.epoch = epoch + 1
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else 0.0,
               "active_triplets": active, "triplets": len(trip),
               "seconds": time.perf_counter() - t0, "mining_seconds": t_mine}
        if eval_fn is not None:
            model.eval()
            rec.update(eval_fn(model))
        state.history.append(rec)
        log.info("epoch %d: %s", epoch + 1, rec)
        save(model, opt, state)
    return state


# --------------------------------------------------------------------------- data


def load_training_images(files: Sequence[Path], settings: Any
                         ) -> tuple[list[torch.Tensor], list[int], list[tuple[str, str]]]:
    """Decode and resize every training image once (step A's resize rule, from the
    settings), kept in memory as uint8 (3, H, W): each is read several times per epoch.
    Returns the images, the indices that loaded, and (file, reason) for the others."""
    from tqdm import tqdm

    from lib.features.images import load_image, resize_image, target_size

    images, ok, bad = [], [], []
    for i, f in enumerate(tqdm(files, desc="loading", unit="img")):
        try:
            img = load_image(Path(f), settings["max_image_pixels"])
        except UserError as e:
            bad.append((str(f), str(e)))
            continue
        hw = target_size(img.width, img.height, settings["resize"], settings["input_size"],
                         settings["max_side"])
        images.append(resize_image(img, hw, settings["antialias"]))
        ok.append(i)
    return images, ok, bad


# --------------------------------------------------------------------------- the step


def checkpoint_path(settings: Any) -> Path:
    return Path(settings["train_checkpoint"] or Path(settings["path_models"]) / "triplet.pt")


def run_training(settings: Any, eval_fn: Callable[[RetrievalNet], dict[str, float]] | None
                 = None) -> dict[str, Any]:
    """Step T on validated settings: load the list and images, build or resume the model,
    train, checkpoint after every epoch (under the output lock). Returns a summary."""
    from lib.artefacts import canonical_hash, library_versions, output_lock, read_json
    from lib.features.networks import build_backbone
    from lib.learned.training_data import read_training_json

    if settings["train_json"] is None:
        raise UserError(f"{settings.source}: key 'train_json': give the training list "
                        "(or --train)")
    ts = read_training_json(settings["train_json"])
    layer = settings["train_layer"] or settings["layers"][-1]
    bb = build_backbone(settings["network"], settings["weights"], [layer],
                        settings["weights_file"])
    if layer not in bb.channels:
        raise UserError(f"{settings.source}: key 'train_layer': {layer!r} is not a layer of "
                        f"{settings['network']}")
    channels = int(bb.channels[layer])
    dim = min(int(settings["train_dim"]), channels)
    device = pick_device(settings["device"])
    cfg = TrainConfig(epochs=settings["epochs"], margin=settings["margin"], lr=settings["lr"],
                      batch_triplets=max(1, settings["batch_triplets"]),
                      neg_pool=max(1, settings["neg_pool"]), seed=settings["seed"],
                      embed_batch=max(1, settings["batch_size"]))
    list_hash = canonical_hash(read_json(settings["train_json"]))
    meta = {"layer": layer, "channels": channels, "dim": dim, "L": settings["rmac_levels"],
            "train_json": str(settings["train_json"]), "train_json_hash": list_hash,
            "input_size": settings["input_size"], "resize": settings["resize"],
            "max_side": settings["max_side"], "antialias": settings["antialias"],
            "base_weights": settings["weights"], "config": asdict(cfg),
            "versions": library_versions()}
    ck_path = checkpoint_path(settings)
    resume = None
    if ck_path.exists():
        resume = load_checkpoint(ck_path)
        from lib.artefacts import check_fields

        check_fields({"network": settings["network"], **meta}, {"network": resume["network"],
                     **resume["meta"]}, ["network", "layer", "dim", "L", "train_json_hash",
                                          "input_size", "resize"], str(ck_path),
                     "delete it or set train_checkpoint to a new file to start over")
    images, ok, bad = load_training_images([ts.file(i) for i in range(len(ts))], settings)
    for f, why in bad:
        log.warning("skipped %s: %s", f, why)
    labels = np.array([ts.classes[i] for i in ok])
    meta.update(images=len(images), classes=len(set(labels.tolist())), skipped=len(bad))
    model = RetrievalNet(TappedBackbone(bb, layer), RMACHead(channels, dim,
                                                             settings["rmac_levels"]))
    with output_lock(settings["path_output"], "T"):
        if resume is None:
            init_head_pca(model, images, bb.preprocess, device, 2000,
                          np.random.default_rng(settings["seed"]))

        def save(m: RetrievalNet, opt: torch.optim.Optimizer, st: TrainState) -> None:
            save_checkpoint(ck_path, m, settings["network"], dict(bb.preprocessing),
                            {**meta, "history": st.history}, opt, st)

        state = train_triplet(model, images, labels, bb.preprocess, cfg, device, save,
                              resume, eval_fn)
    return {"images": len(images), "classes": meta["classes"], "epoch": state.epoch,
            "history": state.history, "device": str(device), "checkpoint": str(ck_path)}
