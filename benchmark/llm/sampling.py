"""Temperature sampling of several generations per prompt (CALRec's BM25 inference).

The prompt runs once per user. Its keys/values are kept ONCE per user and every sample of
that user attends to them through the shared-prompt attention (`benchmark.llm.shared_prefix`),
as beam search does: no copy of the prompt cache per sample (for a 7B model at CALRec's 16
samples that copy is ~16 GiB). Each sample's own generated tokens go to a small per-row
cache. A model the shared attention cannot reproduce falls back to the copied cache
(`shared_prompt=False`), which is also the reference the tests compare against.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmark.llm.kv_cache import buffered_cache, empty_cache_like, layers_kv, left_pad, prefill, step
from benchmark.llm.shared_prefix import SharedPrefix, shared_step

__all__ = ["sample_generations"]


@torch.inference_mode()
def sample_generations(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n_samples: int,
    temperature: float,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    shared_prompt: bool = True,
) -> list[list[tuple[list[int], float]]]:
    """`n_samples` temperature samples per prompt: (token ids without eos, model log-prob).

    Tokens are drawn from softmax(logits / temperature) (temperature 0: greedy); the returned
    log-prob is the model's own (untempered) sequence log-probability including eos.
    Seeded with a torch.Generator on the model's device; runs in the caller's precision
    context (`benchmark.llm.precision.inference_precision`).
    """
    from benchmark.llm.decoding import with_fallback

    if n_samples < 1 or max_new_tokens < 1:
        raise ValueError("n_samples and max_new_tokens must be >= 1")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    order = np.argsort([-len(p) for p in prompt_ids], kind="stable")
    results: list[list[tuple[list[int], float]]] = [[] for _ in prompt_ids]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(batches, desc="sample", disable=not progress, dynamic_ncols=True):
        prompts = [list(prompt_ids[int(i)]) or [eos_id] for i in chunk]
        state = gen.get_state()

        def run(shared: bool, prompts=prompts, state=state):
            gen.set_state(state)  # a fallback redraws the same samples
            return _sample_batch(model, prompts, n_samples, temperature, max_new_tokens, pad_id, eos_id, gen,
                                 shared)

        (seqs, scores), shared_prompt = with_fallback(run, shared_prompt)
        for b, i in enumerate(chunk):
            user = []
            for j in range(b * n_samples, (b + 1) * n_samples):
                seq = seqs[j].tolist()
                seq = seq[: seq.index(eos_id)] if eos_id in seq else seq
                user.append((seq, float(scores[j])))
            results[int(i)] = user
    model.train(was_training)
    return results


def _sample_batch(model, prompts, n, temperature, max_new, pad_id, eos_id, gen, shared_prompt):
    """Samples of one batch of prompts: (tokens [B*n, steps], log-probs [B*n]), rows user-major."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    plen = mask.sum(1)
    logits, prompt_cache = prefill(model, ids, mask, log_probs=False)
    pairs = layers_kv(prompt_cache)
    if shared_prompt:
        shared = SharedPrefix(pairs, mask)
        shared.place(torch.arange(B, device=device).repeat_interleave(n), torch.arange(n, device=device).repeat(B), n)
        cache = empty_cache_like(pairs, B * n, max_new + 1)
    else:
        cache = buffered_cache(pairs, n, max_new + 1)
        mask = mask.repeat_interleave(n, 0)
    del prompt_cache, pairs
    logits = logits.repeat_interleave(n, 0)
    positions = plen.repeat_interleave(n)
    rows = B * n
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    total = torch.zeros(rows, device=device)
    tokens: list[torch.Tensor] = []
    for t in range(max_new):
        log_probs = torch.log_softmax(logits, -1)
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
        else:
            nxt = logits.argmax(-1)
        total = total + torch.where(done, torch.zeros_like(total), log_probs.gather(1, nxt[:, None])[:, 0])
        nxt = torch.where(done, torch.full_like(nxt, int(pad_id)), nxt)
        tokens.append(nxt)
        done = done | (nxt == eos_id)
        if bool(done.all()) or t == max_new - 1:
            break
        if shared_prompt:
            logits = shared_step(model, step, shared, cache, nxt, None, positions + t, log_probs=False)
        else:
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], 1)
            logits = step(model, cache, nxt, mask, positions + t, log_probs=False)
    return torch.stack(tokens, 1).cpu().numpy(), total.cpu().numpy()
