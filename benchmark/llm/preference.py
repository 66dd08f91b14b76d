"""P2Rec's pieces (baselines/p2rec.py is the method): preference targets over latent
categories, the pooled-state head and its losses, item embeddings of prompts that share a
prefix, their projection to the downstream model's width, and the row's leaderboard note.
Module-level so tests can check each on its own."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.errors import ConfigError
from benchmark.llm.kv_cache import cache_kwargs, output_cache
from benchmark.llm.pooling import batch_ids, embed_batches, pool, pooled_hidden
from benchmark.llm.training import decoder_body

PROJECTIONS = ("pca", "random", "head")
Example = tuple[np.ndarray, np.ndarray]  # (prompt token ids int32, target distribution float32 [K])


def preference_targets(
    sequences: Sequence[np.ndarray], labels: np.ndarray, k: int, last: int | None = None
) -> np.ndarray:
    """g_u per sequence: [n, k] float32, the share of the (last `last`) items in each category."""
    out = np.zeros((len(sequences), k), dtype=np.float32)
    for row, seq in enumerate(sequences):
        seq = np.asarray(seq, dtype=np.int64)
        if last is not None:
            seq = seq[-last:]
        if len(seq):
            out[row] = np.bincount(labels[seq], minlength=k) / len(seq)
    return out


def common_prefix_len(ids: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix every sequence shares."""
    if not ids:
        return 0
    first = list(ids[0])
    n = len(first)
    for seq in ids[1:]:
        m = min(n, len(seq))
        i = 0
        while i < m and seq[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


@torch.inference_mode()
def embed_shared_prefix(
    model: Any,
    ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    pooling: str = "mean",
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "p2rec items",
) -> tuple[torch.Tensor, int]:
    """Pooled last hidden states [n, d] (float32, CPU) of many prompts that share a prefix.

    The shared prefix runs once; its key/value cache is repeated for each batch of suffixes
    (right-padded, positions continuing after the prefix). Mean pooling adds the prefix's
    states to each row's suffix states, so the result equals `pooled_hidden` of the full
    prompts. Returns (embeddings, prefix length); falls back to full prompts when the shared
    prefix is shorter than 2 tokens.
    """
    from tqdm.auto import tqdm

    n = len(ids)
    prefix_len = min(common_prefix_len(ids), min((len(s) for s in ids), default=1) - 1)
    if prefix_len < 2:
        return embed_batches(model, ids, pad_id=pad_id, pooling=pooling, batch_size=batch_size,
                             progress=progress, desc=desc), 0
    import copy

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    body = decoder_body(model)
    prefix = torch.as_tensor([list(ids[0][:prefix_len])], dtype=torch.long, device=device)
    out = body(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True)  # caller's precision
    cache = output_cache(out)
    prefix_sum = out.last_hidden_state[0].float().sum(0)  # [d]
    order = sorted(range(n), key=lambda i: -len(ids[i]))
    result: torch.Tensor | None = None
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        rows = order[start : start + batch_size]
        batch = batch_ids([list(ids[i][prefix_len:]) for i in rows], pad_id, device)
        mask = batch["attention_mask"]
        full_mask = torch.cat([torch.ones((len(rows), prefix_len), dtype=mask.dtype, device=device), mask], 1)
        positions = prefix_len + (mask.cumsum(1) - 1).clamp(min=0)
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(len(rows))
        o = body(input_ids=batch["input_ids"], attention_mask=full_mask, position_ids=positions,
                 use_cache=True, **cache_kwargs(body, past))
        hidden = o.last_hidden_state.float()
        if pooling == "mean":
            m = mask.to(hidden.dtype)
            pooled = (prefix_sum + (hidden * m[..., None]).sum(1)) / (prefix_len + m.sum(1, keepdim=True))
        else:
            pooled = pool(hidden, mask, "last")
        if result is None:
            result = torch.zeros((n, pooled.shape[1]), dtype=torch.float32)
        result[torch.as_tensor(rows)] = pooled.cpu()
    model.train(was_training)
    return result if result is not None else torch.zeros((0, 0)), prefix_len


def xavier_std(n_items: int, width: int) -> float:
    """Std of torch's xavier_normal_ on an [n_items + 1, width] embedding table (SASRec's init)."""
    return math.sqrt(2.0 / (n_items + 1 + width))


def project_embeddings(
    emb: np.ndarray | torch.Tensor,
    width: int,
    *,
    method: str = "pca",
    seed: int = 0,
    target_std: float,
    head_weight: np.ndarray | None = None,
    head_bias: np.ndarray | None = None,
) -> np.ndarray:
    """[n, d] LLM embeddings -> [n, width] float32, centred and scaled to `target_std`."""
    x = torch.as_tensor(np.asarray(emb), dtype=torch.float64)
    n, d = x.shape
    rng = np.random.default_rng([seed, 2406])
    if method == "head":
        if head_weight is None:
            raise ConfigError("projection='head' needs the trained preference head")
        w = torch.as_tensor(head_weight, dtype=torch.float64)
        x = x @ w.T + (0.0 if head_bias is None else torch.as_tensor(head_bias, dtype=torch.float64))
        d = x.shape[1]
    x = x - x.mean(0, keepdim=True)
    if method == "pca":
        cov = x.T @ x / max(n - 1, 1)
        _, _, vh = torch.linalg.svd(cov)
        comps = vh[: min(width, d)]
        # fix each component's sign: its largest-magnitude loading is positive
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
        z = x @ comps.T
        if z.shape[1] < width:
            z = torch.cat([z, torch.zeros((n, width - z.shape[1]), dtype=z.dtype)], 1)
    elif method == "head" and d == width:
        z = x
    elif method in ("random", "head"):
        r = torch.as_tensor(rng.normal(size=(d, width)) / math.sqrt(width), dtype=torch.float64)
        z = x @ r
    else:
        raise ConfigError(f"unknown projection {method!r}; use one of {', '.join(PROJECTIONS)}")
    std = float(z.std(correction=0)) if z.numel() > 1 else 0.0
    if std > 0:
        z = z * (target_std / std)
    return z.numpy().astype(np.float32)


def _weights_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _examples_hash(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for ids, target in examples:
        digest.update(np.asarray(ids, dtype=np.int32).tobytes())
        digest.update(np.asarray(target, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def collate_examples(
    examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Right-padded prompts plus the stacked target distributions."""
    batch = batch_ids([list(ids) for ids, _ in examples], pad_id, device)
    batch["targets"] = torch.as_tensor(np.stack([t for _, t in examples]), dtype=torch.float32, device=device)
    return batch


def head_input(pooled: torch.Tensor, norm: str) -> torch.Tensor:
    """What the linear head reads: the pooled state, unit-normalised with norm="l2"."""
    return F.normalize(pooled.float(), dim=-1) if norm == "l2" else pooled


def head_predictions(
    model: Any, head: nn.Module, batch: dict[str, torch.Tensor], pooling: str, norm: str = "l2"
) -> torch.Tensor:
    """The head's raw output [b, K] (float32) for a batch of prompts."""
    pooled = pooled_hidden(model, batch["input_ids"], batch["attention_mask"], pooling)
    return head(head_input(pooled, norm).to(head.weight.dtype)).float()


def distribution_loss(z: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-example loss [b]: squared error summed over K (mse), or KL(g || softmax z) (kl)."""
    if loss == "mse":
        return ((z - targets) ** 2).sum(1)
    logp = F.log_softmax(z, dim=1)
    return (torch.special.xlogy(targets, targets) - targets * logp).sum(1)


def predicted_distribution(z: torch.Tensor, loss: str) -> torch.Tensor:
    return z if loss == "mse" else F.softmax(z, dim=1)


def leaderboard_note(cost: dict, params: Any) -> str:
    """The row's note: what the LLM stage cost across every attempt, and whether this run resumed it
    from a step checkpoint (then this process trained only the rest, or nothing)."""
    tokens = cost.get("tokens_processed")
    resumed = int(cost.get("resumed_from") or 0)
    resume = (f", resumed from its step-{resumed} checkpoint ({cost.get('prior_train_seconds')} s of training "
              f"before the resume)" if resumed else "")
    return (f"serves a {params.downstream} initialised from LLM item embeddings ({params.projection}, "
            f"{params.init}); LLM stage: {cost.get('train_examples')} user-level examples (instance-level SFT "
            f"would use {cost.get('instance_level_examples')}), "
            f"{'an unrecorded number of' if tokens is None else tokens} tokens, "
            f"{cost.get('llm_stage_seconds')} s incl. {cost.get('embedding_seconds')} s of item embedding{resume}")
