"""In-batch contrastive losses and span pooling for LLM towers (CALRec; reusable by others).

- `info_nce(queries, keys, tau, groups=..., direction=...)`: InfoNCE over a batch of
  (query, key) pairs with cosine similarity / tau. Row i's positive is key i; every other
  key in the batch is a negative, except keys whose `groups` value equals row i's (the
  same item appearing twice in a batch: its copies are identical positives, never
  negatives), which are left out of the denominator.
- `span_mask(starts, ends, width)` and `span_mean(hidden, starts, ends)`: masked mean of
  hidden states over a token span per row (a history block, a target item's tokens), so
  one forward pass of "prompt + target" yields both the user-tower and the
  target-conditioned embeddings.
- `text_groups(token_lists)`: group ids from token sequences (equal text = equal group),
  for the duplicate mask when the same text can carry several catalog ids.

Last-layer states come from `benchmark.llm.pooling.last_hidden`; span means of many
sequences in inference batches from `benchmark.llm.pooling.embed_batches(..., starts=...)`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from benchmark.llm.pooling import pool

__all__ = [
    "DIRECTIONS", "similarity_logits", "info_nce", "span_mask", "span_mean", "text_groups",
]

DIRECTIONS = ("q2k", "k2q", "both")


def similarity_logits(queries: torch.Tensor, keys: torch.Tensor, tau: float) -> torch.Tensor:
    """cos(queries[i], keys[j]) / tau as a float32 [n_q, n_k] matrix."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    return q @ k.T / tau


def _not_negative(groups: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [n, n]: off-diagonal pairs that share a group (excluded from the denominator)."""
    if groups is None:
        return None
    groups = torch.as_tensor(groups, device=device).reshape(-1)
    if groups.numel() != n:
        raise ValueError(f"groups has {groups.numel()} entries for a batch of {n}")
    same = groups[:, None] == groups[None, :]
    return same & ~torch.eye(n, dtype=torch.bool, device=device)


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    tau: float,
    *,
    groups: torch.Tensor | Sequence[int] | None = None,
    direction: str = "q2k",
    reduction: str = "mean",
) -> torch.Tensor:
    """In-batch InfoNCE with cosine similarity: pairs (queries[i], keys[i]) are positives.

    direction "q2k": for each query i, -log softmax_j(s_ij)[i] (its key among all keys);
    "k2q": for each key i, -log softmax_j(s_ji)[i] (its query among all queries);
    "both": the mean of the two. Entries (i, j), j != i, with groups[i] == groups[j] are
    masked out of the softmax in either direction. reduction: "mean" | "sum" | "none"
    (per pair, [n]). A batch of one pair has no negatives and gives loss 0.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if queries.shape[0] != keys.shape[0]:
        raise ValueError(f"{queries.shape[0]} queries but {keys.shape[0]} keys")
    n = queries.shape[0]
    logits = similarity_logits(queries, keys, tau)
    masked = _not_negative(groups, n, logits.device)
    if masked is not None:
        logits = logits.masked_fill(masked, float("-inf"))
    target = torch.arange(n, device=logits.device)
    parts = []
    if direction in ("q2k", "both"):
        parts.append(F.cross_entropy(logits, target, reduction="none"))
    if direction in ("k2q", "both"):
        parts.append(F.cross_entropy(logits.T, target, reduction="none"))
    loss = torch.stack(parts).mean(0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def span_mask(starts: torch.Tensor, ends: torch.Tensor, width: int) -> torch.Tensor:
    """Boolean [b, width]: True on positions starts[i] <= t < ends[i] of row i."""
    starts = torch.as_tensor(starts).reshape(-1, 1)
    ends = torch.as_tensor(ends, device=starts.device).reshape(-1, 1)
    positions = torch.arange(width, device=starts.device)[None, :]
    return (positions >= starts) & (positions < ends)


def span_mean(hidden: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Mean of hidden[i, starts[i]:ends[i]] per row, differentiable, in float32: [b, d]."""
    starts, ends = torch.as_tensor(starts, device=hidden.device), torch.as_tensor(ends, device=hidden.device)
    return pool(hidden.float(), span_mask(starts, ends, hidden.shape[1]), "mean")


def text_groups(token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
    """int64 [n]: equal token sequences get equal ids (first-seen order)."""
    ids: dict[tuple[int, ...], int] = {}
    return torch.tensor([ids.setdefault(tuple(int(t) for t in s), len(ids)) for s in token_lists], dtype=torch.long)
