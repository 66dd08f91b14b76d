"""Random: a uniformly random ranking of the allowed items (the floor every method must beat)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from benchmark.ranking import rank_by_scores
from benchmark.registry import Method, register_method
from benchmark.types import RankedLists, RankRequest, TrainData


@register_method("random")
class RandomRec(Method):
    """Scores every item with an i.i.d. uniform draw from a generator seeded by the run seed."""

    @dataclass
    class Params:
        pass

    def fit(self, data: TrainData) -> None:
        self.n_items = data.n_items

    def rank(self, request: RankRequest) -> RankedLists:
        gen = torch.Generator().manual_seed(int(self.ctx.seed))

        def score(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
            return torch.rand((len(users), self.n_items), generator=gen)

        return rank_by_scores(request, self.n_items, score)
