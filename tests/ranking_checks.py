"""Shared by the LLM-method tests: a request over the validation users, and the checks every ranked row must pass."""

from __future__ import annotations

import numpy as np

from benchmark.types import PAD, CandidateSet, RankRequest, TrainData


def request_for(data: TrainData, k: int, candidates: CandidateSet | None = None) -> RankRequest:
    """Rank the validation users with their validation target appended to the history."""
    users = data.valid.users
    hist = [np.append(h, t) for h, t in zip(data.valid.histories, data.valid.targets)]
    return RankRequest(users, hist, candidates or CandidateSet("full", users), k)


def check_rows(ranked, request: RankRequest, n_items: int) -> None:
    for row, hist in enumerate(request.histories):
        items = ranked.items[row]
        real = items[items != PAD]
        assert len(real) == len(set(real.tolist()))  # distinct
        assert ((real >= 0) & (real < n_items)).all()  # catalog items only
        assert not set(real.tolist()) & set(np.asarray(hist).tolist())  # no seen items
