"""Triplet loss and hard-negative mining on tiny generated data, the R-MAC head, and the
checkpoint round trip (weights_only) and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lib.errors import UserError
from lib.learned.rmac import fit_rmac_pca, rmac, rmac_region_vectors, rmac_regions
from lib.learned.triplet import (
    CHECKPOINT_FORMAT,
    RetrievalNet,
    RMACHead,
    TappedBackbone,
    TrainConfig,
    embed,
    hardest_negatives,
    head_from_checkpoint,
    init_head_pca,
    load_checkpoint,
    make_triplets,
    save_checkpoint,
    train_triplet,
    triplet_loss,
)

torch.set_num_threads(1)


def _tiny_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
    )


def _preprocess(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 - 0.5


def _tiny_set(n_classes: int = 4, per_class: int = 3, seed: int = 0):
    """Each class: a fixed random colour pattern; its images are noisy, shifted copies.
    One landscape size and one portrait size, as the fixed resize gives."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(n_classes):
        base = rng.integers(0, 256, (3, 36, 36))
        for i in range(per_class):
            dy, dx = rng.integers(0, 4, 2)
            h, w = (32, 24) if i % 2 else (24, 32)
            im = base[:, dy: dy + h, dx: dx + w] + rng.normal(0, 25, (3, h, w))
            images.append(torch.from_numpy(np.clip(im, 0, 255).astype(np.uint8)))
            labels.append(f"class{c}")
    return images, np.array(labels)


def test_triplet_loss_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # first: dp 0, dn 2 -> max(0, .1 - 2) = 0; second: dp 2, dn 0 -> .1 + 2
    assert float(triplet_loss(a, p, n, 0.1)) == pytest.approx(2.1 / 2)


def test_mined_negatives_are_the_hardest():
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(30, 8)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    labels = rng.integers(0, 5, 30)
    hard = hardest_negatives(desc, labels, 3)
    sim = desc @ desc.T
    for i in range(30):
        other = np.flatnonzero(labels != labels[i])
        expect = other[np.argsort(-sim[i, other], kind="stable")[:3]]
        assert hard[i].tolist() == expect.tolist()
        assert np.all(labels[hard[i]] != labels[i])


def test_hardest_negatives_pads_when_few_exist():
    desc = np.eye(3, dtype=np.float32)
    hard = hardest_negatives(desc, np.array([0, 0, 1]), 3)
    assert hard[0].tolist() == [2, -1, -1] and hard[2].tolist()[:2] in ([0, 1], [1, 0])


def test_make_triplets_positives_and_negatives():
    rng = np.random.default_rng(1)
    desc = rng.normal(size=(20, 4)).astype(np.float32)
    labels = np.repeat(np.arange(5), 4)
    labels[19] = 7  # a singleton class: never an anchor, may be a negative
    trip = make_triplets(desc, labels, np.random.default_rng(2), neg_pool=1)
    assert 19 not in trip[:, 0] and len(trip) == 19
    assert np.all(labels[trip[:, 0]] == labels[trip[:, 1]])
    assert np.all(trip[:, 0] != trip[:, 1])
    hard = hardest_negatives(desc, labels, 1)[:, 0]
    np.testing.assert_array_equal(trip[:, 2], hard[trip[:, 0]])  # neg_pool 1 = the hardest
    with pytest.raises(UserError):
        make_triplets(desc[:3], np.array([0, 1, 2]), rng)


def test_head_equals_numpy_rmac():
    rng = np.random.default_rng(3)
    fmap = rng.random((2, 6, 9, 13)).astype(np.float32)
    regions = np.concatenate([rmac_region_vectors(m, rmac_regions(9, 13)) for m in fmap])
    pca = fit_rmac_pca(regions, 5)
    head = RMACHead(6, 5)
    head.init_from_pca(pca)
    out = head(torch.from_numpy(fmap)).detach().numpy()
    ref = np.stack([rmac(m, 3, pca) for m in fmap])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def _model(images, seed: int = 0) -> RetrievalNet:
    model = RetrievalNet(_tiny_backbone(seed), RMACHead(16, 8))
    init_head_pca(model, images, _preprocess, torch.device("cpu"), 100,
                  np.random.default_rng(0))
    return model


def test_training_decreases_the_loss_and_checkpoints(tmp_path):
    images, labels = _tiny_set()
    model = _model(images)
    cfg = TrainConfig(epochs=4, lr=3e-3, batch_triplets=6, neg_pool=2, margin=0.5)
    saved = []

    def save(m, opt, state):
        save_checkpoint(tmp_path / "ck.pt", m, "tiny", {"scale": 255.0}, {"channels": 16,
                        "dim": 8, "L": 3, "layer": "x"}, opt, state)
        saved.append(state.epoch)

    state = train_triplet(model, images, labels, _preprocess, cfg, torch.device("cpu"), save)
    loss = [h["loss"] for h in state.history]
    assert saved == [1, 2, 3, 4]
    assert loss[-1] < loss[0] * 0.8, loss
    ck = load_checkpoint(tmp_path / "ck.pt")
    assert ck["format"] == CHECKPOINT_FORMAT and ck["network"] == "tiny" and ck["epoch"] == 4
    # the round trip: a fresh model with the checkpoint's weights gives the same descriptors
    fresh = RetrievalNet(_tiny_backbone(seed=9), head_from_checkpoint(ck))
    fresh.backbone.load_state_dict(ck["state_dict"])
    model.eval()
    fresh.eval()
    a = embed(model, images, _preprocess, torch.device("cpu"))
    b = embed(fresh, images, _preprocess, torch.device("cpu"))
    torch.testing.assert_close(a, b)
    # plain torch.load with weights_only=True reads it (what step A's loader does)
    raw = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert set(raw["state_dict"]) == set(_tiny_backbone().state_dict())


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    images, labels = _tiny_set(n_classes=3, per_class=2, seed=5)
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_triplets=3, neg_pool=2, margin=0.5)
    meta = {"channels": 16, "dim": 8, "L": 3}

    def saver(path):
        return lambda m, opt, st: save_checkpoint(path, m, "tiny", {}, meta, opt, st)

    full = _model(images)
    train_triplet(full, images, labels, _preprocess, cfg, torch.device("cpu"),
                  saver(tmp_path / "full.pt"))
    part = _model(images)
    one = TrainConfig(**{**cfg.__dict__, "epochs": 1})
    train_triplet(part, images, labels, _preprocess, one, torch.device("cpu"),
                  saver(tmp_path / "part.pt"))
    resumed = _model(images, seed=3)
    state = train_triplet(resumed, images, labels, _preprocess, cfg, torch.device("cpu"),
                          saver(tmp_path / "part.pt"), resume=load_checkpoint(tmp_path / "part.pt"))
    assert state.epoch == 2 and len(state.history) == 2
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="format"):
        load_checkpoint(tmp_path / "x.pt")
    (tmp_path / "t.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "t.pt")


class _DictBackbone(nn.Module):
    """Shaped like lib.features.networks' Backbone: forward returns {layer: map}."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _tiny_backbone()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": self.features(x)}


def test_tapped_backbone_saves_the_inner_state_dict(tmp_path):
    inner = _DictBackbone()
    model = RetrievalNet(TappedBackbone(inner, "x"), RMACHead(16, 8))
    # meta with non-plain values (torch's version string class, numpy scalars, paths)
    meta = {"channels": 16, "dim": 8, "torch": torch.__version__, "x": np.float64(0.5),
            "p": tmp_path}
    save_checkpoint(tmp_path / "c.pt", model, "tiny", {}, meta)
    ck = load_checkpoint(tmp_path / "c.pt")
    assert set(ck["state_dict"]) == set(inner.state_dict())  # no adapter prefix
    assert ck["meta"]["torch"] == str(torch.__version__) and ck["meta"]["x"] == 0.5
    fresh = _DictBackbone()
    fresh.load_state_dict(ck["state_dict"])
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(fresh(x)["x"], inner(x)["x"])


def _step_t_setup(tmp_path):
    from PIL import Image

    from lib.learned.training_data import TrainingSet, write_training_json

    images, labels = _tiny_set(n_classes=3, per_class=2, seed=7)
    (tmp_path / "img").mkdir()
    paths = []
    for i, im in enumerate(images):
        paths.append(f"{i}.png")
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / "img" / paths[-1])
    write_training_json(tmp_path / "train.json",
                        TrainingSet(tmp_path / "img", paths, labels.tolist()))
    (tmp_path / "gt.json").write_text('{"imlist": [], "qimlist": [], "gnd": []}')
    settings = {"dataset": "t", "gt_format": "generic", "path_images": "img",
                "path_gt": "gt.json", "path_output": "run", "network": "efficientnet_lite0",
                "weights": "random", "layers": ["head"], "input_size": [64, 48],
                "train_json": "train.json", "epochs": 1, "train_dim": 16, "lr": 1e-4,
                "num_workers": 0, "device": "cpu"}
    (tmp_path / "s.json").write_text(json.dumps(settings))
    return paths, labels


def test_step_t_trains_resumes_and_step_a_loads_the_checkpoint(tmp_path):
    """Step T's entry point on 6 tiny images (Lite0, random weights): checkpoint written, a
    rerun with more epochs resumes, lib.features.networks (step A, weights = file) loads the
    trained weights, and another training list refuses to resume."""
    from lib.features.networks import build_backbone
    from lib.learned.step import fine_tune
    from lib.learned.training_data import TrainingSet, write_training_json
    from lib.settings import load_settings

    paths, labels = _step_t_setup(tmp_path)
    res = fine_tune(load_settings(tmp_path / "s.json"))
    ck_path = tmp_path / "run" / "models" / "triplet.pt"
    ck = load_checkpoint(ck_path)
    assert res.counts["epoch"] == ck["epoch"] == 1
    assert res.step == "T" and res.outputs == (ck_path,)
    assert res.summary.startswith("T: 6 images in ") and "epoch 1/1" in res.summary
    assert ck["meta"]["layer"] == "head" and ck["meta"]["dim"] == 16
    res = fine_tune(load_settings(tmp_path / "s.json", ["epochs=2"]))
    ck2 = load_checkpoint(ck_path)
    assert res.counts["epoch"] == ck2["epoch"] == 2 and "epoch 2/2" in res.summary
    assert [h["epoch"] for h in ck2["history"]] == [1, 2]
    bb = build_backbone("efficientnet_lite0", "file", ["head"], ck_path)
    for k, v in bb.state_dict().items():
        torch.testing.assert_close(v, ck2["state_dict"][k])
    write_training_json(tmp_path / "train.json",
                        TrainingSet(tmp_path / "img", paths[:4], labels[:4].tolist()))
    with pytest.raises(UserError, match="train_json_hash"):
        fine_tune(load_settings(tmp_path / "s.json", ["epochs=3"]))


@pytest.mark.slow
def test_step_t_command_line(tmp_path):
    """The script itself (slow: a fresh interpreter loads torch): exit 0, summary line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _step_t_setup(tmp_path)
    script = Path(__file__).resolve().parent.parent / "bow_pipeline" / "T_train_triplet.py"
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "s.json"), "-q"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "epoch 1/1" in run.stdout and (tmp_path / "run/models/triplet.pt").is_file()
