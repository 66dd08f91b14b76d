"""Exact ranking: every item's answer log-likelihood equals a plain full forward pass."""

from __future__ import annotations

import numpy as np
import torch

from benchmark.llm.likelihood import item_log_likelihoods, rank_by_likelihood, rank_of
from benchmark.llm.loading import tiny_llm


def naive(model, prompt, answer, eos):
    ids = torch.as_tensor([list(prompt) + list(answer) + [eos]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    start = len(prompt)
    return float(sum(logp[start - 1 + i, t] for i, t in enumerate(list(answer) + [eos])))


def test_item_log_likelihoods_match_a_full_forward_pass_for_answers_of_any_length():
    llm = tiny_llm(hidden=32, layers=2, seed=3)
    prompt = [5, 17, 230, 44, 9, 1200]
    answers = [[300], [300, 301], [12, 13, 14, 15, 16], [7, 300, 8], [301]]
    got = item_log_likelihoods(llm.model, prompt, answers, eos_id=llm.eos_id, pad_id=llm.pad_id, chunk=2)
    want = [naive(llm.model, prompt, a, llm.eos_id) for a in answers]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rank_by_likelihood_excludes_and_breaks_ties_by_id():
    scores = np.array([-3.0, -1.0, -1.0, -0.5, -7.0])
    items, top = rank_by_likelihood(scores, exclude=np.array([3]), k=3)
    assert items.tolist() == [1, 2, 0] and top.tolist() == [-1.0, -1.0, -3.0]
    assert rank_of(scores, 2, np.array([3])) == 2 and rank_of(scores, 4, np.array([])) == 5
