"""Exact ranking: the log-likelihood of every catalog item's answer under the model.

For one prompt, log P(answer tokens + eos | prompt) = sum over the answer's tokens of the
next-token log-probability, for every item of the catalog. The prompt runs once; its
key/value cache is repeated for chunks of items (right-padded answers, positions
continuing after the prompt). Logits are fp32 (`fp32_head`), log-softmax in fp32.

This is the yardstick of a constrained beam search: the beam's top items should be the
most likely ones, and where they are not, the difference is search error, not model error
(bench/bench_search_error.py). It costs one forward pass over every catalog answer per
user: minutes per user on a CPU for a 1,682-item catalog, about a second on a GPU.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch

from benchmark.llm.precision import fp32_head


def _cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The model's keyword for a KV cache (`cache` in newer transformers, `past_key_values` before)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params and "past_key_values" not in params else {"past_key_values": cache}


@torch.inference_mode()
def item_log_likelihoods(
    model: Any,
    prompt: Sequence[int],
    answers: Sequence[Sequence[int]],
    *,
    eos_id: int,
    pad_id: int,
    chunk: int = 64,
) -> np.ndarray:
    """float64 [len(answers)]: log P(answer + eos | prompt) under `model` (in eval mode).

    `answers` are token ids without eos (as the decoding trie holds them). Runs in the caller's
    precision context (`inference_precision`); the output head is fp32 either way.
    """
    from transformers import DynamicCache

    if not len(prompt):
        raise ValueError("empty prompt")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.as_tensor([list(prompt)], dtype=torch.long, device=device)
    out_scores = np.zeros(len(answers), dtype=np.float64)
    with fp32_head(model):
        first = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                      **_cache_kwargs(model, DynamicCache()))
        first_logp = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
        cache = getattr(first, "past_key_values", None) or getattr(first, "cache", None)
        n_prompt = ids.shape[1]
        order = np.argsort([-len(a) for a in answers], kind="stable")
        for start in range(0, len(order), chunk):
            rows = order[start : start + chunk]
            seqs = [list(answers[i]) + [eos_id] for i in rows]
            width = max(len(s) for s in seqs)
            x = torch.full((len(rows), width), int(pad_id), dtype=torch.long, device=device)
            real = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
            for r, s in enumerate(seqs):
                x[r, : len(s)] = torch.as_tensor(s, device=device)
                real[r, : len(s)] = True
            score = first_logp[x[:, 0]].double()
            if width > 1:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(rows))
                mask = torch.cat([torch.ones((len(rows), n_prompt), dtype=torch.long, device=device),
                                  real[:, :-1].long()], dim=1)
                positions = n_prompt + torch.arange(width - 1, device=device).expand(len(rows), -1)
                res = model(input_ids=x[:, :-1], attention_mask=mask, position_ids=positions, use_cache=True,
                            **_cache_kwargs(model, past))
                logp = torch.log_softmax(res.logits.float(), dim=-1)  # [c, width-1, V]
                step = logp.gather(2, x[:, 1:, None])[..., 0].double()
                score = score + (step * real[:, 1:]).sum(1)
            out_scores[rows] = score.cpu().numpy()
    model.train(was_training)
    return out_scores


def rank_by_likelihood(scores: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item ids by likelihood (ties by id), excluded ids never returned; (items, scores)."""
    s = scores.astype(np.float64).copy()
    s[np.asarray(exclude, dtype=np.int64)] = -np.inf
    order = np.lexsort((np.arange(len(s)), -s))[:k]
    order = order[np.isfinite(s[order])]
    return order.astype(np.int64), s[order]


def rank_of(scores: np.ndarray, item: int, exclude: np.ndarray) -> int:
    """1-based rank of `item` among the allowed items by likelihood (ties by id)."""
    s = scores.astype(np.float64).copy()
    s[np.asarray(exclude, dtype=np.int64)] = -np.inf
    better = (s > s[item]).sum() + ((s == s[item]) & (np.arange(len(s)) < item)).sum()
    return int(better) + 1
