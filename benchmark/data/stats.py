"""Statistics of a split: one row per part (all / train / valid / test), plus preprocessing counts.

Columns: users, items, interactions, density (interactions / (users * items)), and the mean
and median length of the part's sequences: whole sequences for "all", training sequences
for "train", histories before the target for "valid" and "test". For valid/test,
`interactions` counts targets and `items` the distinct target items.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from benchmark.types import EvalSet, Split

COLUMNS = ("part", "users", "items", "interactions", "density", "mean_length", "median_length")
PREPROCESS_KEYS = (
    ("raw_interactions", "raw interactions"),
    ("duplicate_rows", "exact duplicate rows dropped"),
    ("repeated_pairs", "repeated (user, item) pairs dropped"),
    ("untitled_interactions", "interactions with untitled items dropped"),
    ("untitled_items", "untitled items dropped"),
    ("kcore_removed", "interactions removed by k-core"),
    ("kcore_users_removed", "users removed by k-core"),
    ("kcore_items_removed", "items removed by k-core"),
    ("interactions", "interactions kept"),
)


def _row(part: str, users: int, items: int, interactions: int, lengths: np.ndarray) -> dict[str, Any]:
    density = interactions / (users * items) if users and items else 0.0
    return {
        "part": part,
        "users": int(users),
        "items": int(items),
        "interactions": int(interactions),
        "density": float(density),
        "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
        "median_length": float(np.median(lengths)) if len(lengths) else 0.0,
    }


def _eval_row(part: str, evalset: EvalSet) -> dict[str, Any]:
    lengths = np.fromiter((len(h) for h in evalset.histories), dtype=np.int64, count=len(evalset))
    return _row(part, len(evalset), len(np.unique(evalset.targets)), len(evalset), lengths)


def split_stats(split: Split) -> list[dict[str, Any]]:
    """Rows for all / train / valid / test (see module docstring)."""
    counts = split.config.get("preprocess", {})
    n_inter = int(counts.get("interactions", 0))
    n_users = int(counts.get("users", split.n_users))
    all_row = _row("all", n_users, split.n_items, n_inter, np.zeros(0))
    all_row["mean_length"] = n_inter / n_users if n_users else 0.0
    all_row["median_length"] = float(counts.get("median_sequence_length", 0.0))

    train_lengths = np.fromiter((len(s) for s in split.train), dtype=np.int64, count=len(split.train))
    nonempty = train_lengths[train_lengths > 0]
    train_items = len(np.unique(np.concatenate(split.train))) if nonempty.sum() else 0
    train_row = _row("train", len(nonempty), train_items, int(nonempty.sum()), nonempty)
    return [all_row, train_row, _eval_row("valid", split.valid), _eval_row("test", split.test)]


def stats_frame(split: Split) -> pd.DataFrame:
    """`split_stats` as a DataFrame indexed by part."""
    return pd.DataFrame(split_stats(split), columns=list(COLUMNS)).set_index("part")


def preprocess_counts(split: Split) -> dict[str, int]:
    """{description: count} of what preprocessing dropped, in pipeline order."""
    counts = split.config.get("preprocess", {})
    return {label: int(counts[key]) for key, label in PREPROCESS_KEYS if key in counts}
