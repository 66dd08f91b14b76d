"""Preprocessing shared by every protocol: implicit feedback, de-duplication, titled items only,
iterative k-core, chronological order per user, internal ids.

Steps, in order (each one counted in `Prepared.counts`):
1. every rating is an interaction (implicit feedback; the rating value is ignored);
2. exact duplicate (user, item, timestamp) rows are dropped;
3. a (user, item) pair seen again is dropped, keeping the earliest (timestamp, then row order);
4. interactions whose item has no title are dropped (LLM methods need text, and every method
   must see the same data);
5. iterative k-core: users and items each keep >= k interactions;
6. users sorted by raw id and items by raw id (natural order: numeric ids numerically) get
   internal ids 0..n-1; each user's interactions are ordered by (timestamp, original row).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from benchmark.errors import DataError
from benchmark.types import Catalog, RawDataset

_DIGITS = re.compile(r"^[0-9]+$")


@dataclass
class Prepared:
    """Preprocessed interactions, grouped by internal user id in chronological order."""

    dataset: str
    user_ids: list[str]  # raw id per internal user id
    catalog: Catalog
    items: np.ndarray  # int64 [n], internal item ids, user-major, chronological within a user
    timestamps: np.ndarray  # int64 [n], aligned with items
    offsets: np.ndarray  # int64 [n_users + 1]: user u owns items[offsets[u]:offsets[u + 1]]
    counts: dict[str, int | float] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.catalog)

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def times(self, user: int) -> np.ndarray:
        return self.timestamps[self.offsets[user] : self.offsets[user + 1]]


def natural_order(ids: list[str] | np.ndarray) -> list[str]:
    """Sort raw ids: all-digit ids numerically (and before others), the rest as strings."""

    def key(value: str) -> tuple[int, int, str]:
        if _DIGITS.match(value):
            return (0, int(value), value)
        return (1, 0, value)

    return sorted((str(v) for v in ids), key=key)


def _catalog(items: pd.DataFrame, raw_ids: list[str]) -> Catalog:
    table = items.drop_duplicates("item", keep="first").set_index("item")
    rows = table.loc[raw_ids]
    years: list[int | None] = [None if pd.isna(y) else int(y) for y in rows["year"].tolist()]
    genres = rows["genres"].fillna("").astype(str).tolist() if "genres" in rows else [""] * len(raw_ids)
    return Catalog(
        raw_ids=list(raw_ids),
        titles=rows["title"].astype(str).str.strip().tolist(),
        years=years,
        genres=genres,
    )


def _titled_items(items: pd.DataFrame) -> set[str]:
    titles = items["title"].astype("string").fillna("").str.strip()
    return set(items["item"].astype(str)[titles.to_numpy() != ""].tolist())


def kcore_mask(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the interactions that survive the iterative k-core (codes are 0..n-1)."""
    keep = np.ones(len(users), dtype=bool)
    if k <= 1 or len(users) == 0:
        return keep
    n_users = int(users.max()) + 1
    n_items = int(items.max()) + 1
    while True:
        u, i = users[keep], items[keep]
        user_ok = np.bincount(u, minlength=n_users) >= k
        item_ok = np.bincount(i, minlength=n_items) >= k
        drop = keep & ~(user_ok[users] & item_ok[items])
        if not drop.any():
            return keep
        keep &= ~drop


def preprocess(raw: RawDataset, kcore: int = 5, dataset: str | None = None) -> Prepared:
    """Run steps 1-6 (module docstring) on a loader's RawDataset."""
    name = dataset or raw.name
    if kcore < 0:
        raise DataError(f"--kcore must be >= 0, got {kcore}")
    frame = raw.interactions
    for col in ("user", "item", "timestamp"):
        if col not in frame.columns:
            raise DataError(f"{name}: the loader gave no {col!r} column (source {raw.source})")
    if "item" not in raw.items.columns or "title" not in raw.items.columns:
        raise DataError(f"{name}: the item table needs 'item' and 'title' columns (source {raw.source})")
    n_raw = len(frame)
    user_codes, user_values = pd.factorize(frame["user"].astype(str), sort=False)
    item_codes, item_values = pd.factorize(frame["item"].astype(str), sort=False)
    if (user_codes < 0).any() or (item_codes < 0).any():
        raise DataError(f"{name}: some interactions have no user or item id (source {raw.source})")
    times = frame["timestamp"].to_numpy().astype(np.int64)
    rows = np.arange(n_raw, dtype=np.int64)
    counts: dict[str, int | float] = {
        "raw_interactions": n_raw,
        "raw_users": len(user_values),
        "raw_items": len(item_values),
    }

    # 2 + 3. sort by (user, item, timestamp, row): within a (user, item) group the first row is
    # the earliest; a later row with the same timestamp as its predecessor is an exact
    # duplicate, any other later row a repeated pair.
    pair = user_codes.astype(np.int64) * max(len(item_values), 1) + item_codes
    order = np.lexsort((rows, times, pair))
    pair_s, time_s = pair[order], times[order]
    same_pair = np.zeros(n_raw, dtype=bool)
    same_pair[1:] = pair_s[1:] == pair_s[:-1]
    same_time = np.zeros(n_raw, dtype=bool)
    same_time[1:] = time_s[1:] == time_s[:-1]
    counts["duplicate_rows"] = int((same_pair & same_time).sum())
    counts["repeated_pairs"] = int((same_pair & ~same_time).sum())
    keep = np.ones(n_raw, dtype=bool)
    keep[order[same_pair]] = False

    # 4. items without a title
    titled = _titled_items(raw.items)
    item_titled = np.fromiter((v in titled for v in item_values), dtype=bool, count=len(item_values))
    untitled = keep & ~item_titled[item_codes]
    counts["untitled_interactions"] = int(untitled.sum())
    counts["untitled_items"] = int(len(np.unique(item_codes[untitled])))
    keep &= ~untitled
    if not keep.any():
        raise DataError(f"{name}: no interaction is left after dropping duplicates and untitled items")

    # 5. iterative k-core
    before = int(keep.sum())
    idx = rows[keep]
    survive = kcore_mask(user_codes[idx], item_codes[idx], kcore)
    idx = idx[survive]
    counts["kcore_removed"] = before - len(idx)
    if len(idx) == 0:
        raise DataError(f"k-core (k={kcore}) removed every interaction of {name}; lower --kcore")

    # 6. internal ids and chronological order
    kept_users = np.unique(user_codes[idx])
    kept_items = np.unique(item_codes[idx])
    user_ids = natural_order(user_values[kept_users])
    item_ids = natural_order(item_values[kept_items])
    user_rank = np.full(len(user_values), -1, dtype=np.int64)
    user_rank[pd.Index(user_values).get_indexer(user_ids)] = np.arange(len(user_ids))
    item_rank = np.full(len(item_values), -1, dtype=np.int64)
    item_rank[pd.Index(item_values).get_indexer(item_ids)] = np.arange(len(item_ids))
    u = user_rank[user_codes[idx]]
    it = item_rank[item_codes[idx]]
    t = times[idx]
    order = np.lexsort((idx, t, u))
    u, it, t = u[order], it[order], t[order]
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(u, minlength=len(user_ids)), out=offsets[1:])

    counts["users"] = len(user_ids)
    counts["items"] = len(item_ids)
    counts["interactions"] = len(it)
    counts["median_sequence_length"] = float(np.median(np.diff(offsets)))
    counts["kcore_users_removed"] = int(len(np.unique(user_codes[rows[keep]])) - len(user_ids))
    counts["kcore_items_removed"] = int(len(np.unique(item_codes[rows[keep]])) - len(item_ids))
    catalog = _catalog(raw.items.assign(item=raw.items["item"].astype(str)), item_ids)
    return Prepared(
        dataset=name,
        user_ids=user_ids,
        catalog=catalog,
        items=it.astype(np.int64),
        timestamps=t.astype(np.int64),
        offsets=offsets,
        counts=counts,
    )
