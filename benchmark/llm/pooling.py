"""Pooled hidden states as embeddings, with gradients (training) or cached (inference).

Used by CALRec (two towers: history text and item text through one LLM) and P2Rec
(preference parsing from a user's pooled output; enhanced item embeddings).

- `pooled_hidden(model, input_ids, attention_mask, pooling)`: last-layer states pooled over
  the real tokens of each row; differentiable; right or left padding both work because
  the attention mask says which tokens are real.
- `batch_ids(ids, pad_id, device)`: right-padded input_ids / attention_mask for a list of
  token-id lists.
- `cached_item_embeddings(path, compute)`: load `path` (safetensors) if present, else
  compute and write it atomically; the caller puts the checkpoint's fingerprint in the path
  so that new weights never read old embeddings.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

POOLINGS = ("mean", "last")


def batch_ids(ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask` [n, longest]."""
    width = max((len(s) for s in ids), default=1)
    x = torch.full((len(ids), max(width, 1)), pad_id, dtype=torch.long)
    m = torch.zeros_like(x)
    for row, seq in enumerate(ids):
        x[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        m[row, : len(seq)] = 1
    return {"input_ids": x.to(device), "attention_mask": m.to(device)}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """[b, s, d] states -> [b, d]: the mean over real tokens, or the last real token's state."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    # last real token: the highest index where the mask is 1 (works for left and right padding)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(1).clamp(min=0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def last_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer states [b, s, d] of `model` (peft-wrapped or not), with gradients.

    Runs the decoder body only (no LM head), so no vocabulary-sized tensor is built.
    Position ids restart at each row's first real token, so left padding is handled too.
    """
    from benchmark.llm.training import decoder_body

    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    out = decoder_body(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def pooled_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Pooled last-layer hidden states [b, d] (see `last_hidden`), with gradients."""
    return pool(last_hidden(model, input_ids, attention_mask), attention_mask, pooling)


@torch.inference_mode()
def embed_batches(
    model: Any,
    ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    pooling: str = "mean",
    starts: Sequence[int] | None = None,
    ends: Sequence[int] | None = None,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "embed items",
) -> torch.Tensor:
    """Pooled last-layer states of many sequences in length-sorted batches: float32 [n, d] on
    the CPU, computed in the model's precision (bf16 autocast for bf16 weights). With `starts` (and optionally `ends`, default each row's
    length) the mean runs over tokens starts[i] <= t < ends[i] only, e.g. a prompt's history span."""
    from tqdm.auto import tqdm

    if starts is not None:
        ends = [len(x) for x in ids] if ends is None else ends
        if not len(ids) == len(starts) == len(ends):
            raise ValueError("ids, starts and ends must have the same length")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[torch.Tensor | None] = [None] * len(ids)
    from benchmark.llm.precision import autocast, model_precision

    with autocast(device, model_precision(model)):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
            rows = order[start : start + batch_size]
            batch = batch_ids([ids[i] for i in rows], pad_id, device)
            hidden = last_hidden(model, batch["input_ids"], batch["attention_mask"]).float()
            mask = batch["attention_mask"]
            if starts is not None:
                positions = torch.arange(mask.shape[1], device=device)[None, :]
                lo = torch.tensor([int(starts[i]) for i in rows], device=device)[:, None]
                hi = torch.tensor([int(ends[i]) for i in rows], device=device)[:, None]
                mask = mask.bool() & (positions >= lo) & (positions < hi)
                pooled = pool(hidden, mask, "mean")
            else:
                pooled = pool(hidden, mask, pooling)
            for i, vec in zip(rows, pooled.cpu()):
                out[i] = vec
    model.train(was_training)
    if not out:
        return torch.zeros((0, 0))
    return torch.stack(out)  # type: ignore[arg-type]


def cached_item_embeddings(path: str | os.PathLike | None, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(embeddings, loaded_from_cache). With `path` None nothing is cached."""
    from safetensors.torch import load_file, save_file

    if path is None:
        return compute(), False
    path = Path(path)
    if path.is_file():
        return load_file(str(path))["embeddings"], True
    emb = compute().float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".safetensors")
    os.close(fd)
    try:
        save_file({"embeddings": emb}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return emb, False
