"""Per-user metrics: a hand-computed case, edge cases, and agreement with ranx per user."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmark.errors import ConfigError
from benchmark.scoring.metrics import (
    METRIC_NAMES,
    coverage,
    metric_keys,
    parse_metric,
    per_user_metrics,
)
from benchmark.types import PAD


def test_hand_computed_tiny_case():
    ranked = np.array(
        [
            [3, 1, 2],  # target 3 at rank 1
            [0, 5, 4],  # target 4 at rank 3
            [7, 8, PAD],  # target 9 absent
            [PAD, PAD, PAD],  # empty list, target 0
        ],
        dtype=np.int64,
    )
    targets = np.array([3, 4, 9, 0], dtype=np.int64)
    m = per_user_metrics(ranked, targets, cutoffs=(1, 2, 3))
    np.testing.assert_array_equal(m["hr@1"], [1, 0, 0, 0])
    np.testing.assert_array_equal(m["hr@2"], [1, 0, 0, 0])
    np.testing.assert_array_equal(m["hr@3"], [1, 1, 0, 0])
    np.testing.assert_array_equal(m["recall@3"], m["hr@3"])
    np.testing.assert_allclose(m["mrr@3"], [1.0, 1.0 / 3.0, 0.0, 0.0])
    np.testing.assert_allclose(m["mrr@2"], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(m["ndcg@3"], [1.0, 1.0 / math.log2(4.0), 0.0, 0.0])
    np.testing.assert_allclose(m["ndcg@1"], [1.0, 0.0, 0.0, 0.0])
    assert set(m) == set(metric_keys((1, 2, 3)))
    assert all(v.dtype == np.float64 and v.shape == (4,) for v in m.values())


def test_pad_target_never_matches_pad_entries():
    ranked = np.array([[PAD, PAD], [1, PAD]], dtype=np.int64)
    targets = np.array([PAD, PAD], dtype=np.int64)
    m = per_user_metrics(ranked, targets, cutoffs=(1, 2))
    assert m["hr@2"].sum() == 0.0 and m["ndcg@2"].sum() == 0.0


def test_duplicates_in_a_row_are_rejected():
    ranked = np.array([[1, 2, 3], [4, 5, 4]], dtype=np.int64)
    with pytest.raises(ValueError, match="row 1"):
        per_user_metrics(ranked, np.array([1, 4]), cutoffs=(1,))
    # repeated PAD is fine
    ok = per_user_metrics(np.array([[1, PAD, PAD]]), np.array([1]), cutoffs=(3,))
    assert ok["hr@3"][0] == 1.0


def test_cutoff_longer_than_lists_is_a_config_error():
    with pytest.raises(ConfigError, match="cutoff 20"):
        per_user_metrics(np.zeros((2, 10), dtype=np.int64) + np.arange(10), np.array([0, 1]), cutoffs=(10, 20))


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="one entry per row"):
        per_user_metrics(np.arange(6).reshape(2, 3), np.array([1, 2, 3]), cutoffs=(1,))


def test_parse_metric():
    assert parse_metric("ndcg@10") == ("ndcg", 10)
    assert parse_metric("HR@5") == ("hr", 5)
    assert set(METRIC_NAMES) == {"hr", "ndcg", "mrr", "recall"}
    for bad in ("ndcg", "map@10", "ndcg@0", "ndcg@x", "@10", ""):
        with pytest.raises(ConfigError):
            parse_metric(bad)


def test_coverage():
    ranked = np.array([[0, 1, 2], [1, 2, 3], [4, PAD, PAD]], dtype=np.int64)
    assert coverage(ranked, n_items=10, k=2) == pytest.approx(4 / 10)  # {0,1,2,4}
    assert coverage(ranked, n_items=10, k=3) == pytest.approx(5 / 10)
    assert coverage(np.full((2, 3), PAD), n_items=5) == 0.0
    with pytest.raises(ValueError):
        coverage(ranked, n_items=3, k=3)


def _random_case(n_users=500, k=20, n_items=300, seed=0):
    rng = np.random.default_rng(seed)
    ranked = np.stack([rng.choice(n_items, size=k, replace=False) for _ in range(n_users)]).astype(np.int64)
    # some short lists, PAD-filled at the end
    short = rng.random(n_users) < 0.1
    lengths = rng.integers(1, k, size=n_users)
    for u in np.flatnonzero(short):
        ranked[u, lengths[u] :] = PAD
    targets = rng.integers(0, n_items, size=n_users)
    # half the users get a target from inside their list
    inside = rng.random(n_users) < 0.5
    for u in np.flatnonzero(inside):
        valid = ranked[u][ranked[u] != PAD]
        targets[u] = valid[rng.integers(0, len(valid))]
    return ranked, targets.astype(np.int64)


@pytest.mark.filterwarnings("ignore:.*unsafe cast")
def test_agrees_with_ranx_per_user():
    ranx = pytest.importorskip("ranx")
    ranked, targets = _random_case()
    n, k = ranked.shape
    qrels_dict = {f"u{u}": {f"i{targets[u]}": 1} for u in range(n)}
    run_dict = {
        f"u{u}": {f"i{item}": float(k - pos) for pos, item in enumerate(ranked[u]) if item != PAD} for u in range(n)
    }
    qrels, run = ranx.Qrels(qrels_dict), ranx.Run(run_dict)
    ours = per_user_metrics(ranked, targets, cutoffs=(1, 5, 10, 20))
    ranx_names = {"hr": "hit_rate", "ndcg": "ndcg", "mrr": "mrr", "recall": "recall"}
    wanted = [f"{ranx_names[m]}@{c}" for c in (1, 5, 10, 20) for m in METRIC_NAMES]
    theirs = ranx.evaluate(qrels, run, wanted, return_mean=False, threads=1)
    # ranx orders queries by sorted id; map back to our row order
    order = sorted(range(n), key=lambda u: f"u{u}")
    checked = 0
    for c in (1, 5, 10, 20):
        for m in METRIC_NAMES:
            per_query = np.asarray(theirs[f"{ranx_names[m]}@{c}"])
            ours_sorted = ours[f"{m}@{c}"][order]
            np.testing.assert_allclose(ours_sorted, per_query, rtol=0, atol=1e-9, err_msg=f"{m}@{c}")
            checked += 1
    assert checked == 16
    # the random case really mixes hits and misses
    assert 0.2 < ours["hr@20"].mean() < 0.8
