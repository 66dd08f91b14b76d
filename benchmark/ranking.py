"""Turn per-item score matrices into RankedLists, honouring the candidate set.

Shared by every method that scores the whole catalog (pop, random, SASRec, P2Rec):
seen items are masked, items outside a sampled/retrieved candidate set are masked,
and the top-k is taken in batches so a large catalog never needs a users x items matrix.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from benchmark.errors import MethodError
from benchmark.types import PAD, RankedLists, RankRequest

ScoreFn = Callable[[np.ndarray, list[np.ndarray]], torch.Tensor]


def allowed_mask(request: RankRequest, rows: slice, n_items: int, device: torch.device | str) -> torch.Tensor:
    """Boolean [b, n_items]: True where the item may be ranked for that user."""
    users = request.users[rows]
    b = len(users)
    cand = request.candidates
    if cand.items is None:
        mask = torch.ones((b, n_items), dtype=torch.bool, device=device)
    else:
        mask = torch.zeros((b, n_items), dtype=torch.bool, device=device)
        items = torch.as_tensor(cand.items[rows], device=device)
        valid = items >= 0
        row_idx = torch.arange(b, device=device).unsqueeze(1).expand_as(items)
        mask[row_idx[valid], items[valid]] = True
    if cand.exclude_seen:
        hist = request.histories[rows]
        lengths = [len(h) for h in hist]
        if sum(lengths):
            flat = torch.as_tensor(np.concatenate(hist).astype(np.int64), device=device)
            row = torch.repeat_interleave(torch.arange(b, device=device), torch.as_tensor(lengths, device=device))
            mask[row, flat] = False
    return mask


def rank_by_scores(
    request: RankRequest,
    n_items: int,
    score_fn: ScoreFn,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> RankedLists:
    """Call `score_fn(users, histories) -> [b, n_items]` batch by batch and keep the top-k.

    Masked items get -inf and never appear; a row with fewer than k allowed items is PAD-filled.
    Ties are broken towards the lower item id (deterministic on every device). A NaN score of
    an allowed item is a MethodError (it has no place in an order); +inf ranks first, and a
    -inf score means "not rankable", like a masked item.
    """
    n = len(request.users)
    k = request.k
    out_items = np.full((n, k), PAD, dtype=np.int64)
    out_scores = np.full((n, k), -np.inf, dtype=np.float64)
    for start in range(0, n, batch_size):
        rows = slice(start, min(n, start + batch_size))
        with torch.no_grad():
            scores = score_fn(request.users[rows], request.histories[rows]).to(device=device, dtype=torch.float32)
            mask = allowed_mask(request, rows, n_items, scores.device)
            if bool(torch.isnan(scores[mask]).any()):
                raise MethodError(f"its scores are NaN for {int(torch.isnan(scores[mask]).sum())} allowed items "
                                  "(a diverged or broken model); fix the model or its inputs")
            scores = scores.masked_fill(~mask, float("-inf"))
            kk = min(k, n_items)
            # stable tie-break: sort by (-score, item id) via a stable descending sort
            top_scores, top_idx = torch.sort(scores, dim=1, descending=True, stable=True)
            top_scores, top_idx = top_scores[:, :kk], top_idx[:, :kk]
        s = top_scores.cpu().double().numpy()
        i = top_idx.cpu().numpy().astype(np.int64)
        i[s == -np.inf] = PAD  # masked (or unrankable) items only: they sort last
        out_items[rows, :kk] = i
        out_scores[rows, :kk] = s
    return RankedLists(users=request.users.copy(), items=out_items, scores=out_scores)


def popularity_order(train: list[np.ndarray], n_items: int) -> np.ndarray:
    """Item ids by training popularity, most popular first (ties by id)."""
    counts = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in train] or [np.zeros(0, np.int64)]),
                         minlength=n_items)
    return np.lexsort((np.arange(n_items), -counts)).astype(np.int64)


def fill_by_popularity(row: np.ndarray, popular: np.ndarray, exclude: np.ndarray) -> tuple[np.ndarray, int]:
    """The documented fill rule for a generative method's short list: PAD positions take the
    most popular training items not already listed and not excluded. Returns (row, n filled)."""
    row = np.asarray(row, dtype=np.int64).copy()
    free = np.flatnonzero(row == PAD)
    if not len(free):
        return row, 0
    taken = np.concatenate([row[row != PAD], np.asarray(exclude, dtype=np.int64)])
    fill = popular[~np.isin(popular, taken)][: len(free)]
    row = np.concatenate([row[row != PAD], fill, np.full(len(free) - len(fill), PAD, dtype=np.int64)])
    return row, int(len(fill))
