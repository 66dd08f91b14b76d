"""MostPop: items ranked by their number of training interactions (ties: lower item id first)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from benchmark.ranking import rank_by_scores
from benchmark.registry import Method, register_method
from benchmark.types import RankedLists, RankRequest, TrainData


@register_method("pop")
class MostPop(Method):
    """Counts each item's training interactions; the same list for every user, seen items removed."""

    @dataclass
    class Params:
        pass

    def fit(self, data: TrainData) -> None:
        counts = np.zeros(data.n_items, dtype=np.float64)
        for seq in data.train:
            np.add.at(counts, seq, 1.0)
        self.counts = torch.as_tensor(counts, dtype=torch.float32)

    def rank(self, request: RankRequest) -> RankedLists:
        def score(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
            return self.counts.unsqueeze(0).expand(len(users), -1)

        return rank_by_scores(request, len(self.counts), score)
