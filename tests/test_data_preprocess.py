"""Preprocessing: duplicates, repeated pairs, untitled items, k-core, ordering, internal ids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmark.data.preprocess import kcore_mask, natural_order, preprocess
from benchmark.errors import DataError
from benchmark.types import RawDataset


def _raw(rows, titles=None, name="toy") -> RawDataset:
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp"]).astype({"user": str, "item": str})
    items = sorted(set(inter["item"]))
    titles = titles if titles is not None else {i: f"Title {i}" for i in items}
    table = pd.DataFrame(
        {
            "item": list(titles),
            "title": list(titles.values()),
            "year": pd.array([2000] * len(titles), dtype="Int64"),
            "genres": [""] * len(titles),
        }
    )
    return RawDataset(name=name, interactions=inter, items=table, source="memory")


def test_duplicates_and_repeated_pairs_are_counted_and_earliest_kept():
    rows = [
        ("u1", "a", 10), ("u1", "a", 10),  # exact duplicate
        ("u1", "b", 30), ("u1", "b", 5),  # repeat: keep t=5
        ("u1", "c", 20),
        ("u2", "a", 1), ("u2", "b", 2),
    ]  # fmt: skip
    prep = preprocess(_raw(rows), kcore=0)
    assert prep.counts["duplicate_rows"] == 1
    assert prep.counts["repeated_pairs"] == 1
    assert prep.counts["interactions"] == 5
    u1 = prep.user_ids.index("u1")
    items = [prep.catalog.raw_ids[i] for i in prep.sequence(u1)]
    assert items == ["b", "a", "c"]  # b at t=5 (earliest kept), a at 10, c at 20
    assert prep.times(u1).tolist() == [5, 10, 20]


def test_untitled_items_are_dropped_and_counted():
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u2", "c", 4), ("u2", "a", 5)]
    prep = preprocess(_raw(rows, titles={"a": "Alpha", "b": "  ", "c": "Gamma"}), kcore=0)
    assert prep.counts["untitled_interactions"] == 1
    assert prep.counts["untitled_items"] == 1
    assert prep.catalog.raw_ids == ["a", "c"]
    assert prep.catalog.titles == ["Alpha", "Gamma"]


def test_items_missing_from_the_item_table_count_as_untitled():
    rows = [("u1", "a", 1), ("u1", "zzz", 2)]
    prep = preprocess(_raw(rows, titles={"a": "Alpha"}), kcore=0)
    assert prep.counts["untitled_items"] == 1 and prep.catalog.raw_ids == ["a"]


def test_chronological_order_breaks_ties_by_row_order():
    rows = [("u", "c", 7), ("u", "a", 7), ("u", "b", 3), ("u", "d", 7)]
    prep = preprocess(_raw(rows), kcore=0)
    assert [prep.catalog.raw_ids[i] for i in prep.sequence(0)] == ["b", "c", "a", "d"]


def test_internal_ids_follow_natural_raw_order():
    assert natural_order(["10", "9", "b", "100", "a", "2"]) == ["2", "9", "10", "100", "a", "b"]
    rows = [("10", "20", 1), ("9", "3", 2), ("10", "3", 3), ("100", "100", 4)]
    prep = preprocess(_raw(rows), kcore=0)
    assert prep.user_ids == ["9", "10", "100"]
    assert prep.catalog.raw_ids == ["3", "20", "100"]
    assert prep.offsets.tolist() == [0, 1, 3, 4]


def test_kcore_is_iterative():
    # item x has 2 users; removing it drops u3 under 2 interactions, which drops item y ...
    users = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    items = np.array([0, 1, 0, 1, 0, 2, 3, 3])
    keep = kcore_mask(users, items, 2)
    # item 2 has one interaction -> gone; then user 2 has items {0, 3}; item 3 has users {2, 3};
    # user 3 has one interaction -> gone; item 3 falls to 1 -> gone; user 2 falls to 1 -> gone.
    assert keep.tolist() == [True, True, True, True, False, False, False, False]
    sub_u, sub_i = users[keep], items[keep]
    assert np.bincount(sub_u).min() >= 2 and np.bincount(sub_i).min() >= 2


def test_kcore_result_satisfies_k_for_users_and_items():
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{i}", t) for t, (u, i) in enumerate(zip(rng.integers(0, 60, 1500), rng.zipf(1.6, 1500) % 80))]
    prep = preprocess(_raw(rows), kcore=5)
    lengths = np.diff(prep.offsets)
    assert lengths.min() >= 5
    assert np.bincount(prep.items, minlength=prep.n_items).min() >= 5
    assert prep.counts["kcore_removed"] > 0


def test_kcore_that_removes_everything_raises():
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 3)]
    with pytest.raises(DataError, match=r"k-core \(k=5\) removed every interaction of toy; lower --kcore"):
        preprocess(_raw(rows), kcore=5)
