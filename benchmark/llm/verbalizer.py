"""Verbalizer scoring: the logits of a few answer tokens at the end of each prompt.

LlamaRec lists candidates under index letters (A, B, ...) and reads, in one forward pass,
the next-token logits of those letters at the answer position; the logits are the scores.
No generation, so no grounding problem. Any method that asks a multiple-choice question can
use this (`index_labels`, `label_token_ids`, `verbalizer_scores`).
"""

from __future__ import annotations

import string
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmark.errors import ConfigError

MAX_LABELS = len(string.ascii_uppercase)


def index_labels(n: int) -> list[str]:
    """"A", "B", ... for n candidates (at most 26)."""
    if not 1 <= n <= MAX_LABELS:
        raise ConfigError(f"the verbalizer labels candidates A-Z: got {n} candidates, use between 1 and {MAX_LABELS}")
    return list(string.ascii_uppercase[:n])


def label_token_ids(llm: Any, labels: Sequence[str]) -> list[int]:
    """The single token id of each label as the model would answer it (response tokenization).

    Raises ConfigError when a label is not exactly one token for this tokenizer, or two labels
    share a token: the verbalizer would then not be a distribution over candidates.
    """
    from benchmark.llm.prompts import response_ids_batch

    ids = response_ids_batch(llm, list(labels))
    bad = [lab for lab, toks in zip(labels, ids) if len(toks) != 1]
    if bad:
        raise ConfigError(
            f"the verbalizer needs each index label to be one token, but {bad[:3]} are not single tokens for "
            f"the {getattr(llm, 'name', 'model')} tokenizer; use another model or fewer candidates"
        )
    flat = [toks[0] for toks in ids]
    if len(set(flat)) != len(flat):
        raise ConfigError("two index labels map to the same token for this tokenizer; the verbalizer cannot tell them apart")
    return flat


@torch.inference_mode()
def verbalizer_scores(
    model: Any,
    prompts: Sequence[Sequence[int]],
    token_ids: Sequence[int] | Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    progress: bool = False,
    precision: str = "fp32",
) -> np.ndarray:
    """Next-token logits of `token_ids` after each prompt: float64 [n_prompts, n_labels].

    `token_ids` is one list for every prompt, or one list per prompt (prompts with fewer
    candidates: pad their rows with any id and ignore those columns). Prompts are left-padded
    in length-sorted batches with position ids restarting at each prompt's first token, so a
    prompt scores the same alone or in a batch. Only the last position goes through the
    LM head, in fp32 (bf16 letter logits of magnitude 20-30 tie, and ties would fall back to
    the presented order); the body runs under bf16 autocast when `precision` is "bf16".
    """
    from benchmark.llm.kv_cache import left_pad
    from benchmark.llm.precision import autocast, fp32_head
    from benchmark.llm.training import base_model, decoder_body, head_logits

    if not prompts:
        return np.zeros((0, len(token_ids)), dtype=np.float64)
    per_prompt = len(token_ids) > 0 and isinstance(token_ids[0], (list, tuple, np.ndarray))
    table = torch.as_tensor(np.asarray(token_ids if per_prompt else [token_ids] * len(prompts)), dtype=torch.long)
    if table.shape[0] != len(prompts):
        raise ValueError(f"{table.shape[0]} token-id rows for {len(prompts)} prompts")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    out = np.zeros(tuple(table.shape), dtype=np.float64)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    body = decoder_body(model)
    with autocast(device, precision), fp32_head(base_model(model)):
        for rows in tqdm(batches, desc="verbalizer", disable=not progress, dynamic_ncols=True):
            ids, mask = left_pad([list(prompts[i]) for i in rows], pad_id, device)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            res = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            hidden = res[0] if isinstance(res, tuple) else res.last_hidden_state
            logits = head_logits(model, hidden[:, -1, :]).float()
            picked = torch.gather(logits, 1, table[torch.as_tensor(rows)].to(device))
            out[rows] = picked.cpu().numpy()
    model.train(was_training)
    return out
