"""An example third-party method, plugged in without editing the harness:

    python -m benchmark run --methods examples.markov_plugin:Markov,pop --dataset ml-100k

or, from an installed package, through the entry-point group `benchmark.methods`:

    [project.entry-points."benchmark.methods"]
    markov = "examples.markov_plugin:Markov"

It is a first-order Markov chain: score(j | last item i) = count(i -> j) in training
sequences, plus a small popularity prior to break ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from benchmark.ranking import rank_by_scores
from benchmark.registry import Method
from benchmark.types import RankedLists, RankRequest, TrainData


class Markov(Method):
    """First-order Markov chain over consecutive training items (example plugin)."""

    @dataclass
    class Params:
        pop_weight: float = 1e-3  # weight of the popularity prior

    def fit(self, data: TrainData) -> None:
        n = data.n_items
        trans = np.zeros((n, n), dtype=np.float32)
        pop = np.zeros(n, dtype=np.float32)
        for seq in data.train:
            if len(seq):
                np.add.at(pop, seq, 1.0)
            if len(seq) > 1:
                np.add.at(trans, (seq[:-1], seq[1:]), 1.0)
        self.trans = torch.from_numpy(trans)
        self.pop = torch.from_numpy(pop / max(pop.max(), 1.0))
        self.n_items = n

    def rank(self, request: RankRequest) -> RankedLists:
        def score(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
            last = torch.tensor([h[-1] if len(h) else 0 for h in histories], dtype=torch.long)
            has = torch.tensor([len(h) > 0 for h in histories]).unsqueeze(1)
            return self.trans[last] * has + self.params.pop_weight * self.pop

        return rank_by_scores(request, self.n_items, score)
