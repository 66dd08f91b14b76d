"""KV caches for decoding: the cache keyword of the installed transformers, preallocated
buffers, and the prompt (prefill) and one-token (step) forwards every decoder here uses.

- transformers renamed the forward keyword `past_key_values` to `cache` (5.2x deprecates the
  old name; 5.17 knows only the old one). `cache_kwargs(model, cache)` passes the cache
  under whichever name the model's forward declares, and `output_cache(out)` reads it back
  under either name, so decoding, CALRec's sampler and P2Rec's pooling run on both.
- `BufferedLayer` keeps a layer's keys/values in a preallocated buffer (no concatenation per
  step); the prompt part of all beams of one user is identical, so reordering beams only
  moves the generated part (`reorder_tail`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = [
    "BufferedLayer",
    "buffered_cache",
    "cache_kwargs",
    "layers_kv",
    "left_pad",
    "model_device",
    "output_cache",
    "prefill",
    "step",
]


# -- the cache keyword ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cache_name_of(forward_owner: type) -> str:
    try:
        names = inspect.signature(forward_owner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return "past_key_values"
    return "cache" if "cache" in names else "past_key_values"


def _unwrapped(model: Any) -> Any:
    """The transformers module under a peft or DDP wrapper (their forwards take **kwargs)."""
    get = getattr(model, "get_base_model", None)
    model = get() if callable(get) else model
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """{name: cache} with the keyword the model's forward accepts ("cache" or "past_key_values")."""
    return {_cache_name_of(type(_unwrapped(model))): cache}


def output_cache(out: Any) -> Any:
    """The cache a forward returned, under the new name (`cache`) or the old one."""
    keys = out.keys()
    if "cache" in keys:
        return out["cache"]
    return out["past_key_values"] if "past_key_values" in keys else None


# -- preallocated layers ----------------------------------------------------------------------------


class BufferedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values live in a preallocated buffer (no concat per step)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        b, h, length, d = keys.shape
        self.kbuf = keys.new_empty((b, h, capacity, d))
        self.vbuf = values.new_empty((b, h, capacity, d))
        self.kbuf[:, :, :length] = keys
        self.vbuf[:, :, :length] = values
        self.length = length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._views()

    def _views(self):
        self.keys = self.kbuf[:, :, : self.length]
        self.values = self.vbuf[:, :, : self.length]

    def lazy_initialization(self, key_states, value_states, *args, **kwargs):  # already initialised
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        q = key_states.shape[-2]
        if self.length + q > self.kbuf.shape[2]:
            grow = max(q, self.kbuf.shape[2] // 2)
            self.kbuf = torch.cat([self.kbuf, self.kbuf.new_empty(self.kbuf.shape[:2] + (grow,) + self.kbuf.shape[3:])], 2)
            self.vbuf = torch.cat([self.vbuf, self.vbuf.new_empty(self.vbuf.shape[:2] + (grow,) + self.vbuf.shape[3:])], 2)
        self.kbuf[:, :, self.length : self.length + q] = key_states
        self.vbuf[:, :, self.length : self.length + q] = value_states
        self.length += q
        self._views()
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep / repeat / reorder whole rows (one copy of the buffers)."""
        self.kbuf = self.kbuf.index_select(0, rows)
        self.vbuf = self.vbuf.index_select(0, rows)
        self._views()

    def reorder_tail(self, rows: torch.Tensor, start: int) -> None:
        """Reorder positions start.. only (the prompt part is shared by all beams of a user)."""
        if self.length > start:
            self.kbuf[:, :, start : self.length] = self.kbuf[:, :, start : self.length].index_select(0, rows)
            self.vbuf[:, :, start : self.length] = self.vbuf[:, :, start : self.length].index_select(0, rows)
            self._views()


def layers_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # older transformers


def buffered_cache(pairs, expand: int, extra: int) -> DynamicCache:
    """A DynamicCache of BufferedLayer from per-layer (keys, values), rows repeated `expand` times."""
    cache = DynamicCache()
    layers = []
    for k, v in pairs:
        if expand > 1:
            k = k.repeat_interleave(expand, dim=0)
            v = v.repeat_interleave(expand, dim=0)
        layers.append(BufferedLayer(k, v, k.shape[2] + extra))
    cache.layers = layers
    cache.layer_class_to_replicate = None
    return cache


def empty_cache_like(pairs, rows: int, extra: int) -> DynamicCache:
    """A buffered cache of `rows` empty rows shaped like the layers of `pairs` (room for `extra`)."""
    k0 = pairs[0][0]
    empty = k0.new_empty((rows, k0.shape[1], 0, k0.shape[3]))
    return buffered_cache([(empty, empty)] * len(pairs), 1, extra)


# -- batching and forwards ----------------------------------------------------------------------------


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("empty prompt")
        ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, *, log_probs: bool = True):
    """Run the prompts once; return last-position log-probs [B, V] (float32; the logits
    with log_probs=False) and the cache."""
    pos = (mask.cumsum(1) - 1).clamp_(min=0)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        logits_to_keep=1,
        **cache_kwargs(model, DynamicCache()),
    )
    logits = out.logits[:, -1, :].float()
    return (torch.log_softmax(logits, dim=-1) if log_probs else logits), output_cache(out)


def step(model, cache, tokens: torch.Tensor, mask, positions: torch.Tensor, *, log_probs: bool = True, **kwargs):
    """One new token per row; returns its next-token log-probs [R, V] (float32; the logits
    with log_probs=False)."""
    out = model(
        input_ids=tokens[:, None],
        attention_mask=mask,
        position_ids=positions[:, None],
        use_cache=True,
        **cache_kwargs(model, cache),
        **kwargs,
    )
    logits = out.logits[:, -1, :].float()
    return torch.log_softmax(logits, dim=-1) if log_probs else logits
