"""Plain data passed between the stages of the flow (see DESIGN.md).

Internal ids: after preprocessing, users are 0..n_users-1 and items 0..n_items-1.
Raw ids (strings, as the source files spell them) are kept beside them for output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

PAD = -1  # fills ranked-id matrices where a method has fewer than k items for a user


@dataclass
class RawDataset:
    """What a loader returns: interactions plus a catalog of item text.

    interactions: columns user (str), item (str), timestamp (int64), optionally rating.
    items: columns item (str), title (str), year (Int64, may be NA), genres (str, may be "").
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    source: str


@dataclass
class Catalog:
    """Item text in internal-id order; grounding and prompts read the same text."""

    raw_ids: list[str]
    titles: list[str]
    years: list[int | None]
    genres: list[str]

    def __len__(self) -> int:
        return len(self.raw_ids)

    def text(self, item: int, with_year: bool = False, with_genres: bool = False) -> str:
        text = self.titles[item]
        if with_year and self.years[item] is not None:
            text = f"{text} ({self.years[item]})"
        if with_genres and self.genres[item]:
            text = f"{text} [{self.genres[item]}]"
        return text


@dataclass
class EvalSet:
    """One target per user: the item to predict and the chronological history before it."""

    users: np.ndarray  # int64 [n], sorted
    targets: np.ndarray  # int64 [n]
    histories: list[np.ndarray]  # each int64, chronological, oldest first

    def __len__(self) -> int:
        return len(self.users)

    def without_targets(self) -> EvalSet:
        """The same users and histories with targets hidden (what a method may see)."""
        return EvalSet(self.users, np.full_like(self.targets, PAD), self.histories)


@dataclass
class Split:
    """A preprocessed, split dataset. Fingerprinted and cached; shared by every method."""

    dataset: str
    protocol: str  # "loo" or "temporal"
    config: dict[str, Any]
    fingerprint: str
    user_ids: list[str]  # raw user id per internal user id
    catalog: Catalog
    train: list[np.ndarray]  # per internal user id, chronological training items (may be empty)
    valid: EvalSet
    test: EvalSet

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.catalog)

    def train_data(self) -> TrainData:
        return TrainData(
            dataset=self.dataset,
            protocol=self.protocol,
            fingerprint=self.fingerprint,
            n_users=self.n_users,
            n_items=self.n_items,
            catalog=self.catalog,
            train=self.train,
            valid=self.valid,
            times=dict(self.config.get("times") or {}),
        )


@dataclass
class TrainData:
    """What `Method.fit` receives: training sequences and the validation set (never test targets)."""

    dataset: str
    protocol: str
    fingerprint: str
    n_users: int
    n_items: int
    catalog: Catalog
    train: list[np.ndarray]
    valid: EvalSet
    # first/last timestamps of training interactions and test targets (split.config["times"]):
    # a method that trains on another dataset checks it does not reach into this test period
    times: dict[str, Any] = field(default_factory=dict)


@dataclass
class CandidateSet:
    """Which items may be ranked for each user of an EvalSet, stored and shared by all methods.

    protocol "full": every catalog item the user has not seen (items is None).
    "sampled:N[:pop]" / "retrieved:METHOD:K": items[row] lists the allowed ids (PAD-filled).
    """

    protocol: str
    users: np.ndarray  # int64 [n], aligned with the EvalSet
    items: np.ndarray | None = None  # int64 [n, C] or None for full ranking
    exclude_seen: bool = True

    @property
    def is_full(self) -> bool:
        return self.items is None

    @property
    def is_sampled(self) -> bool:
        return self.protocol.startswith("sampled")


@dataclass
class RankRequest:
    """What `Method.rank` receives: users, their histories, their candidates, and k."""

    users: np.ndarray
    histories: list[np.ndarray]
    candidates: CandidateSet
    k: int
    stage: str = "test"  # "valid" or "test"


@dataclass
class RankedLists:
    """Top-k catalog ids per user (PAD where fewer), optional scores and per-user extras.

    extras holds per-user arrays a method reports beside its ranking, e.g. "valid"
    (1.0 if its generation named a real catalog item) for generative methods.
    """

    users: np.ndarray  # int64 [n]
    items: np.ndarray  # int64 [n, k]
    scores: np.ndarray | None = None  # float [n, k]
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # run-level notes (grounding used, ...)
    # two-stage methods: the first stage's own top lists for the same users (LlamaRec's
    # retriever); the runner reports its hit rate and metrics beside the final ones
    first_stage: RankedLists | None = None
