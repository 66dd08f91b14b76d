"""Per-user ranking metrics over a ranked-id matrix, one target per user.

Everything is vectorized numpy: the position of each user's target in its top-k list
is found once, and every metric at every cutoff is a cheap function of that position.

    hr@K      1 if the target is in the top K
    recall@K  the same as hr@K with a single target (both names are kept)
    mrr@K     1 / rank if the target is in the top K (rank counted from 1)
    ndcg@K    1 / log2(rank + 1) if the target is in the top K (ideal DCG is 1)

PAD (-1) entries never match; a target absent from the list scores 0 everywhere.
"""

from __future__ import annotations

import re

import numpy as np

from benchmark.errors import ConfigError
from benchmark.types import PAD

METRIC_NAMES: tuple[str, ...] = ("hr", "ndcg", "mrr", "recall")
DEFAULT_CUTOFFS: tuple[int, ...] = (1, 5, 10, 20)

_METRIC_RE = re.compile(r"^([a-z]+)@(\d+)$")


def parse_metric(name: str) -> tuple[str, int]:
    """"ndcg@10" -> ("ndcg", 10); ConfigError for anything that is not METRIC@K."""
    match = _METRIC_RE.match(str(name).strip().lower())
    if match is None or match.group(1) not in METRIC_NAMES:
        known = ", ".join(f"{m}@K" for m in METRIC_NAMES)
        raise ConfigError(f"unknown metric {name!r}; use one of {known} with K a positive integer, e.g. ndcg@10")
    k = int(match.group(2))
    if k < 1:
        raise ConfigError(f"metric {name!r} has cutoff {k}; the cutoff must be a positive integer, e.g. ndcg@10")
    return match.group(1), k


def metric_keys(cutoffs: tuple[int, ...] | list[int] = DEFAULT_CUTOFFS) -> list[str]:
    """The column names per_user_metrics returns for these cutoffs, in its order."""
    return [f"{name}@{k}" for k in cutoffs for name in METRIC_NAMES]


def check_no_duplicates(ranked_items: np.ndarray, chunk_rows: int = 262_144) -> None:
    """ValueError if any row repeats a (non-PAD) item; a row-wise sort, in chunks."""
    n, k = ranked_items.shape
    if k < 2:
        return
    for start in range(0, n, chunk_rows):
        block = np.sort(ranked_items[start : start + chunk_rows], axis=1)
        same = (block[:, 1:] == block[:, :-1]) & (block[:, 1:] != PAD)
        if same.any():
            row = start + int(np.flatnonzero(same.any(axis=1))[0])
            raise ValueError(
                f"row {row} of the ranked lists repeats an item ({ranked_items[row].tolist()}); "
                "a method must return each item at most once per user"
            )


def target_ranks(ranked_items: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based position of each user's target in its list, or k where it is absent."""
    ranked_items = np.asarray(ranked_items)
    targets = np.asarray(targets)
    if ranked_items.ndim != 2:
        raise ValueError(f"ranked_items must be a 2-D [users, k] matrix, got shape {ranked_items.shape}")
    if targets.ndim != 1 or targets.shape[0] != ranked_items.shape[0]:
        raise ValueError(
            f"targets must be 1-D with one entry per row of ranked_items ({ranked_items.shape[0]}), "
            f"got shape {targets.shape}"
        )
    if not (np.issubdtype(ranked_items.dtype, np.integer) and np.issubdtype(targets.dtype, np.integer)):
        raise ValueError("ranked_items and targets must hold integer item ids")
    check_no_duplicates(ranked_items)
    n, k = ranked_items.shape
    hits = ranked_items == targets[:, None]
    hits &= ranked_items != PAD
    found = hits.any(axis=1)
    return np.where(found, hits.argmax(axis=1), k).astype(np.int64)


def per_user_metrics(
    ranked_items: np.ndarray,
    targets: np.ndarray,
    cutoffs: tuple[int, ...] | list[int] = DEFAULT_CUTOFFS,
) -> dict[str, np.ndarray]:
    """{"hr@K", "ndcg@K", "mrr@K", "recall@K"} -> float64 [n] for every cutoff K.

    ranked_items: int [n, k], PAD-filled; targets: int [n]. A cutoff larger than k is a
    ConfigError (the list is too short to say anything about it).
    """
    ranked_items = np.asarray(ranked_items)
    k = ranked_items.shape[1] if ranked_items.ndim == 2 else 0
    cutoffs = [int(c) for c in cutoffs]
    for c in cutoffs:
        if c < 1 or c > k:
            raise ConfigError(
                f"metric cutoff {c} does not fit ranked lists of length {k}; rank with k >= {max(cutoffs)}"
                + (f" or use cutoffs between 1 and {k}" if k >= 1 else "")
            )
    rank = target_ranks(ranked_items, targets)
    # gains at every possible position (index k = absent -> 0)
    positions = np.arange(k + 1, dtype=np.float64)
    ndcg_gain = np.zeros(k + 1)
    ndcg_gain[:k] = 1.0 / np.log2(positions[:k] + 2.0)
    rr_gain = np.zeros(k + 1)
    rr_gain[:k] = 1.0 / (positions[:k] + 1.0)
    ndcg_all = ndcg_gain[rank]
    rr_all = rr_gain[rank]
    out: dict[str, np.ndarray] = {}
    for c in cutoffs:
        inside = rank < c
        hr = inside.astype(np.float64)
        out[f"hr@{c}"] = hr
        out[f"ndcg@{c}"] = np.where(inside, ndcg_all, 0.0)
        out[f"mrr@{c}"] = np.where(inside, rr_all, 0.0)
        out[f"recall@{c}"] = hr.copy()
    return out


def coverage(ranked_items: np.ndarray, n_items: int, k: int = 10) -> float:
    """Distinct catalog items appearing in anyone's top-k, divided by n_items."""
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    ranked_items = np.asarray(ranked_items)
    top = ranked_items[:, :k].ravel()
    top = top[top != PAD]
    if top.size == 0:
        return 0.0
    if top.min() < 0 or top.max() >= n_items:
        raise ValueError(f"ranked item ids must lie in 0..{n_items - 1} (or be PAD={PAD})")
    seen = np.zeros(n_items, dtype=bool)
    seen[top] = True
    return float(seen.sum()) / float(n_items)
