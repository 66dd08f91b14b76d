"""The synthetic dataset: seeded, parseable specs, and a planted structure a sequential model finds."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark.data import load_raw
from benchmark.data.synthetic import parse_spec, tiny_split
from benchmark.errors import ConfigError


def test_specs_and_seed():
    assert parse_spec("synthetic").seed == 0
    assert parse_spec("synthetic:7").seed == 7
    cfg = parse_spec("synthetic:seed=3, n_users=10,p_next=0.5")
    assert (cfg.seed, cfg.n_users, cfg.p_next) == (3, 10, 0.5)
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        parse_spec("synthetic:bogus=1")
    a = load_raw("synthetic:seed=1,n_users=30,n_items=40")
    b = load_raw("synthetic:seed=1,n_users=30,n_items=40")
    c = load_raw("synthetic:seed=2,n_users=30,n_items=40")
    assert a.interactions.equals(b.interactions) and a.items.equals(b.items)
    assert not a.interactions.equals(c.interactions)
    assert a.items["title"].is_unique and (a.items["title"].str.len() > 0).all()


def _hit_rate(scores_for, split, k=10) -> float:
    hits = 0
    for user, target, hist in zip(split.test.users, split.test.targets, split.test.histories):
        scores = scores_for(hist).astype(float)
        scores[hist] = -np.inf  # seen items are not ranked
        top = np.argsort(-scores, kind="stable")[:k]
        hits += int(target in top)
    return hits / len(split.test)


def test_transition_model_beats_popularity_on_leave_one_out():
    split = tiny_split(seed=0, n_users=300, n_items=200, min_len=20, max_len=40)
    n = split.n_items
    popularity = np.bincount(np.concatenate(split.train), minlength=n).astype(float)
    transitions = np.zeros((n, n))
    for seq in split.train:
        np.add.at(transitions, (seq[:-1], seq[1:]), 1.0)
    # the history of a test user ends with their valid item, a step the training data never saw
    hr_pop = _hit_rate(lambda hist: popularity.copy(), split)
    hr_markov = _hit_rate(lambda hist: transitions[hist[-1]] + 1e-6 * popularity, split)
    assert hr_markov > 1.5 * hr_pop and hr_markov - hr_pop > 0.15, (hr_markov, hr_pop)
