"""AP (Oxford rule) on hand-worked cases, the vectorised variant, revisited E/M/H and
mP@k, TRECVid shot collapse, and evaluate() on a small ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lib.evaluation.metrics import (
    ap_from_ranks,
    average_precision,
    collapse_to_shots,
    evaluate,
    junk_free_ranks,
    precision_at_k,
    precision_recall,
    shot_average_precision,
)
from lib.groundtruth.common import GroundTruth, Query
from lib.search.rankings import Rankings

# [p, n, p] with two positives: 0.5*(1+1)/2 + 0 + 0.5*(1/2 + 2/3)/2 = 19/24
TWO_OF_THREE = 19 / 24


@pytest.mark.parametrize("ranked, pos, junk, expected", [
    (["p1", "n1", "p2"], {"p1", "p2"}, set(), TWO_OF_THREE),
    # junk before the positives is skipped: the positive is at rank 0
    (["j1", "j2", "p1", "n1"], {"p1"}, {"j1", "j2"}, 1.0),
    # junk between positives does not advance the rank: same as [p, n, p]
    (["p1", "j1", "n1", "j2", "p2"], {"p1", "p2"}, {"j1", "j2"}, TWO_OF_THREE),
    # the only positive at rank 1: 1*(0 + 1/2)/2
    (["n1", "p1"], {"p1"}, set(), 0.25),
    (["p1", "n1", "n2"], {"p1"}, set(), 1.0),
    # truncated list: p2 is never retrieved
    (["p1", "n1"], {"p1", "p2"}, set(), 0.5),
    # nothing retrieved at all
    (["n1", "n2"], {"p1"}, set(), 0.0),
])
def test_ap_hand_worked(ranked, pos, junk, expected) -> None:
    assert average_precision(ranked, pos, junk) == pytest.approx(expected, abs=1e-12)
    ids = sorted(set(ranked) | pos | junk)
    idx = {i: k for k, i in enumerate(ids)}
    pm = np.isin(ids, list(pos))
    jm = np.isin(ids, list(junk))
    order = np.array([idx[i] for i in ranked])
    assert ap_from_ranks(junk_free_ranks(order, pm, jm), len(pos)) == \
        pytest.approx(expected, abs=1e-12)


def test_junk_counted_as_negative_would_differ() -> None:
    ranked = ["p1", "j1", "n1", "j2", "p2"]
    assert average_precision(ranked, {"p1", "p2"}, set()) < \
        average_precision(ranked, {"p1", "p2"}, {"j1", "j2"})


def test_no_positives_is_nan() -> None:
    assert math.isnan(average_precision(["a", "b"], set(), {"a"}))
    assert math.isnan(ap_from_ranks(np.array([], dtype=np.int64), 0))


def test_vectorised_matches_walk_on_random_lists() -> None:
    rng = np.random.default_rng(3)
    n = 400
    ids = [f"im{i}" for i in range(n)]
    for _ in range(30):
        pos = set(rng.choice(ids, rng.integers(1, 40), replace=False).tolist())
        rest = [i for i in ids if i not in pos]
        junk = set(rng.choice(rest, rng.integers(0, 30), replace=False).tolist())
        order = rng.permutation(n)[: rng.integers(n // 2, n + 1)]
        ranked = [ids[k] for k in order]
        walk = average_precision(ranked, pos, junk)
        vec = ap_from_ranks(junk_free_ranks(order, np.isin(ids, list(pos)),
                                            np.isin(ids, list(junk))), len(pos))
        assert vec == pytest.approx(walk, abs=1e-12)


def test_precision_recall_skips_junk() -> None:
    r, p = precision_recall(["p1", "j1", "n1", "p2"], {"p1", "p2"}, {"j1"})
    np.testing.assert_allclose(r, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(p, [1.0, 0.5, 2 / 3])


def test_precision_at_k_quirk() -> None:
    # positives at 1-based ranks 1 and 3: P@5 divides by min(3, 5) = 3, not by 5
    np.testing.assert_allclose(precision_at_k(np.array([0, 2]), (1, 5, 10)),
                               [1.0, 2 / 3, 2 / 3])
    np.testing.assert_allclose(precision_at_k(np.array([1, 7]), (1, 5)), [0.0, 1 / 5])
    np.testing.assert_allclose(precision_at_k(np.array([], dtype=np.int64), (1, 5)), [0, 0])


def _revisited_gt() -> GroundTruth:
    db = list("abcxyz")
    q1 = Query("q1", "q1", None, frozenset("ab"), frozenset("c"), easy=frozenset("a"),
               hard=frozenset("b"))
    q2 = Query("q2", "q2", None, frozenset("y"), frozenset(), easy=frozenset("y"),
               hard=frozenset())
    return GroundTruth("r", "revisited", db, [q1, q2])


def _rankings(gt: GroundTruth, lists: dict[str, list[str]]) -> Rankings:
    return Rankings(list(lists), lists, {}, None)


def test_revisited_easy_medium_hard() -> None:
    gt = _revisited_gt()
    res = evaluate(gt, _rankings(gt, {"q1": list("cbxayz"), "q2": list("xyzabc")}))
    # q1 Easy: ok={a}, junk={c,b}: non-junk list x, a -> AP (0/1 + 1/2)/2
    assert res["easy"]["per_query"]["q1"] == pytest.approx(0.25)
    # q1 Medium: ok={a,b}, junk={c}: b, x, a -> (1 + 1)/2 + (1/2 + 2/3)/2, over 2
    assert res["medium"]["per_query"]["q1"] == pytest.approx(19 / 24)
    # q1 Hard: ok={b}, junk={c,a}: b first
    assert res["hard"]["per_query"]["q1"] == pytest.approx(1.0)
    # q2: y at rank 1 -> 0.25 in Easy and Medium; no hard positives -> left out of Hard
    assert res["medium"]["per_query"]["q2"] == pytest.approx(0.25)
    assert res["hard"]["per_query"]["q2"] is None
    assert res["hard"]["n_queries"] == 1 and res["medium"]["n_queries"] == 2
    assert res["hard"]["map"] == pytest.approx(1.0)
    assert res["medium"]["map"] == pytest.approx((19 / 24 + 0.25) / 2)
    assert res["map"] == res["medium"]["map"] and res["n_queries"] == 2
    # mP@k: q1 Medium positives at junk-free ranks 1 and 3 (quirk: P@5 = 2/3);
    # q2 at rank 2: P@1 = 0, P@5 = 1/min(2,5)
    assert res["medium"]["mp@1"] == pytest.approx((1.0 + 0.0) / 2)
    assert res["medium"]["mp@5"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert res["hard"]["mp@10"] == pytest.approx(1.0)


def test_trecvid_shot_collapse_and_ap() -> None:
    db = ["A/shotA_1_k1", "A/shotA_1_k2", "B/shotB_2_k1", "C/shotC_3_k1"]
    shots = {"A/shotA_1_k1": "shotA_1", "A/shotA_1_k2": "shotA_1",
             "B/shotB_2_k1": "shotB_2", "C/shotC_3_k1": "shotC_3"}
    rel = frozenset({"shotA_1", "shotC_3", "shotD_4"})  # shotD_4 has no keyframe
    q = Query("9069_1", "9069.1.src", None, frozenset(db[:2] + db[3:]), frozenset(),
              topic="9069")
    gt = GroundTruth("tv", "trecvid", db, [q], shots=shots, relevant_shots={"9069_1": rel})
    ranked = ["B/shotB_2_k1", "A/shotA_1_k2", "A/shotA_1_k1", "C/shotC_3_k1"]
    res = evaluate(gt, _rankings(gt, {"9069_1": ranked}))
    # shots B, A, C: relevant at ranks 2 and 3, three relevant shots in the qrels
    assert res["per_query"]["9069_1"] == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert res["level"] == "shot" and res["per_topic"]["9069"] == pytest.approx(7 / 18)
    codes = np.array([0, 0, 1, 2])
    np.testing.assert_array_equal(collapse_to_shots(np.array([2, 1, 0, 3]), codes), [1, 0, 2])
    assert shot_average_precision(np.array([0, 1]), np.array([True, False]), 1) == 1.0


def test_evaluate_oxford_per_landmark_and_errors() -> None:
    db = ["a1", "a2", "b1", "b2", "n1"]
    qs = [Query("all_souls_1", "a1", (0, 0, 1, 1), frozenset({"a1", "a2"}), frozenset(),
                topic="all_souls"),
          Query("all_souls_2", "a2", (0, 0, 1, 1), frozenset({"a1", "a2"}),
                frozenset({"n1"}), topic="all_souls"),
          Query("balliol_1", "b1", (0, 0, 1, 1), frozenset({"b1", "b2"}), frozenset(),
                topic="balliol")]
    gt = GroundTruth("ox", "oxford", db, qs)
    lists = {"all_souls_1": ["a1", "n1", "a2", "b1", "b2"],
             "all_souls_2": ["n1", "a2", "a1"],
             "balliol_1": ["b1", "b2", "a1", "a2", "n1"]}
    res = evaluate(gt, _rankings(gt, lists))
    assert list(res["per_query"]) == ["all_souls_1", "all_souls_2", "balliol_1"]
    assert res["per_query"]["all_souls_1"] == pytest.approx(TWO_OF_THREE)
    assert res["per_query"]["all_souls_2"] == pytest.approx(1.0)
    assert res["per_landmark"] == pytest.approx({"all_souls": (TWO_OF_THREE + 1) / 2,
                                                 "balliol": 1.0})
    assert res["map"] == pytest.approx((TWO_OF_THREE + 2) / 3) and res["n_queries"] == 3
    from lib.errors import UserError
    with pytest.raises(UserError, match="line 2: unknown image id 'zz'"):
        evaluate(gt, _rankings(gt, {"balliol_1": ["b1", "zz"]}))
    with pytest.raises(UserError, match="'nope' is not in ground truth"):
        evaluate(gt, _rankings(gt, {"nope": ["b1"]}))


def test_queries_without_positives_warned_left_out_and_listed(caplog) -> None:
    db = ["a", "b", "c"]
    qs = [Query("q1", "a", None, frozenset({"a"}), frozenset()),
          Query("q2", "b", None, frozenset(), frozenset({"c"})),
          Query("q3", "c", None, frozenset({"b"}), frozenset())]
    gt = GroundTruth("g", "generic", db, qs)
    with caplog.at_level("WARNING"):
        res = evaluate(gt, _rankings(gt, {"q1": ["a", "b", "c"], "q2": ["a", "b", "c"],
                                          "q3": ["a", "b", "c"]}))
    assert res["queries_without_positives"] == ["q2"]
    assert res["per_query"]["q2"] is None
    assert res["n_queries"] == 2 and res["n_queries_listed"] == 3
    assert res["map"] == pytest.approx((1.0 + 0.25) / 2)  # q2 is not in the mean
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("q2" in m and "left out of the mean" in m for m in warned)
    # every query has positives: an empty list, no warning
    caplog.clear()
    ok = GroundTruth("g", "generic", db, [qs[0], qs[2]])
    res = evaluate(ok, _rankings(ok, {"q1": ["a", "b", "c"], "q3": ["a", "b", "c"]}))
    assert res["queries_without_positives"] == []
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_revisited_lists_queries_without_positives_per_protocol() -> None:
    gt = _revisited_gt()
    res = evaluate(gt, _rankings(gt, {"q1": list("cbxayz"), "q2": list("xyzabc")}))
    # q2 has no hard positives: left out of Hard only; the top level is Medium's
    assert res["hard"]["queries_without_positives"] == ["q2"]
    assert res["easy"]["queries_without_positives"] == []
    assert res["queries_without_positives"] == res["medium"]["queries_without_positives"] == []
