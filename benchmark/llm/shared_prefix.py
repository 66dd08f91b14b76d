"""Shared-prompt attention: every beam (or sample) of a user attends to ONE copy of that
user's prompt keys/values instead of a copy per beam.

The prompt runs once per user (`kv_cache.prefill`); its K/V stay in a `SharedPrefix`. Each
later one-token step runs the model with a registered attention function that attends to
(a) the user's prompt part, grouped per user as one matmul per (user, kv head), and (b) the
row's own generated part (an ordinary per-row cache). The attention is the model's own
math, including what Gemma-2 and Mistral add:

- `softcap` (Gemma-2's attn_logit_softcapping): scores -> tanh(scores / cap) * cap, before
  any mask, as transformers' eager attention does;
- `sliding_window` (Mistral, Gemma-2/3 local layers): a key column c is visible from the
  query column q iff c > q - window, in cache-column space (prompt columns 0..P-1, then the
  generated ones), as transformers' sliding-window mask is built for the per-beam cache.

What it cannot reproduce it refuses (`SharedPromptUnsupported`: attention sinks, or a model
whose attention does not go through transformers' AttentionInterface); decoders then fall
back to replicating the prompt cache per row (`shared_prompt=False`).
"""

from __future__ import annotations

import torch

from benchmark.errors import ConfigError

SHARED_ATTN = "benchmark_shared_prefix"


class SharedPromptUnsupported(ConfigError):
    """The model's attention has a feature the shared-prompt attention does not implement."""


class SharedPrefix:
    """Prompt K/V of each user, shared by all that user's rows (never copied per row).

    Passed to the model's forward as the `shared_prefix` keyword; transformers hands it on
    to the attention function. Row r of a step belongs to user row_user[r] and sits in slot
    row_slot[r] of the `width` slots that user has.
    """

    def __init__(self, pairs, prompt_mask: torch.Tensor):
        self.keys = [k for k, _ in pairs]
        self.values = [v for _, v in pairs]
        dtype = self.keys[0].dtype
        self.bias = ((1 - prompt_mask.to(dtype)) * torch.finfo(dtype).min)[:, None, None, :]
        self.row_user: torch.Tensor | None = None
        self.row_slot: torch.Tensor | None = None
        self.width = 1
        self.calls = 0

    def place(self, row_user: torch.Tensor, row_slot: torch.Tensor, width: int) -> None:
        self.row_user, self.row_slot, self.width = row_user, row_slot, width


def _softcap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(scores / cap) * cap if cap else scores


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, **kwargs):
    ctx = kwargs.pop("shared_prefix", None)
    if kwargs.get("s_aux") is not None:
        raise SharedPromptUnsupported("shared-prompt attention does not implement attention sinks (s_aux)")
    if ctx is None:
        raise SharedPromptUnsupported("the shared-prompt attention was called without its prompt (shared_prefix)")
    ctx.calls += 1
    R, H, q, D = query.shape  # q == 1 (one new token per row)
    pk, pv = ctx.keys[module.layer_idx], ctx.values[module.layer_idx]
    B, Hkv, P, _ = pk.shape
    t = key.shape[-2]  # generated tokens so far, this one included
    g, W = H // Hkv, ctx.width
    scale = scaling if scaling is not None else D**-0.5
    qr = query.reshape(R, Hkv, g, D)
    # prompt part: scatter rows into [B, W] slots, one matmul per (user, kv head)
    qd = query.new_zeros((B, W, Hkv, g, D))
    qd[ctx.row_user, ctx.row_slot] = qr
    qd = qd.permute(0, 2, 1, 3, 4).reshape(B, Hkv, W * g, D)
    sp = _softcap(torch.matmul(qd, pk.transpose(-1, -2)) * scale, softcap) + ctx.bias  # [B, Hkv, W*g, P]
    sp = sp.view(B, Hkv, W, g, P).permute(0, 2, 1, 3, 4)[ctx.row_user, ctx.row_slot]  # [R, Hkv, g, P]
    sg = _softcap(torch.matmul(qr, key.transpose(-1, -2)) * scale, softcap)  # [R, Hkv, g, t]
    if sliding_window:
        first = P + t - int(sliding_window)  # first visible column from the query column P + t - 1
        low = torch.finfo(sp.dtype).min
        if first > 0:
            sp = sp.clone()
            sp[..., : min(first, P)] = low
        if first > P:
            sg = sg.clone()
            sg[..., : first - P] = low
    w = torch.softmax(torch.cat([sp, sg], -1).float(), -1).to(query.dtype)
    wp, wg = w[..., :P], w[..., P:]
    wd = wp.new_zeros((B, W, Hkv, g, P))
    wd[ctx.row_user, ctx.row_slot] = wp
    wd = wd.permute(0, 2, 1, 3, 4).reshape(B, Hkv, W * g, P)
    op = torch.matmul(wd, pv).view(B, Hkv, W, g, D).permute(0, 2, 1, 3, 4)[ctx.row_user, ctx.row_slot]
    out = op + torch.matmul(wg, value)  # [R, Hkv, g, D]
    return out.reshape(R, 1, H, D), None


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(SHARED_ATTN, shared_prefix_attention)
    AttentionMaskInterface.register(SHARED_ATTN, lambda *args, **kwargs: None)


class attn_implementation:
    """Temporarily switch the model's attention implementation (restored on exit)."""

    def __init__(self, model, name: str | None):
        self.config, self.name = model.config, name

    def __enter__(self):
        self.old = getattr(self.config, "_attn_implementation", None)
        if self.name is not None:
            register()
            self.config._attn_implementation = self.name
        return self

    def __exit__(self, *exc):
        if self.name is not None:
            self.config._attn_implementation = self.old
        return False


def shared_step(model, step_fn, shared: SharedPrefix, *args, **kwargs):
    """One decoding step through the shared-prompt attention; refuses a model that bypasses it."""
    with attn_implementation(model, SHARED_ATTN):
        out = step_fn(model, *args, shared_prefix=shared, **kwargs)
    if shared.calls == 0:
        raise SharedPromptUnsupported(
            "this model's attention does not go through transformers' AttentionInterface")
    return out
