"""A plugin method for the kill -9 test: its fit waits while the file named by $GATE_FILE exists."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from benchmark.ranking import rank_by_scores
from benchmark.registry import Method


class Gate(Method):
    """Ranks by item id; fit blocks while $GATE_FILE exists (so a test can kill the run there)."""

    @dataclass
    class Params:
        pass

    def fit(self, data) -> None:
        gate = os.environ.get("GATE_FILE")
        while gate and os.path.exists(gate):
            time.sleep(0.05)
        self.n_items = data.n_items

    def rank(self, request):
        return rank_by_scores(request, self.n_items, lambda users, histories: torch.zeros(len(users), self.n_items))
