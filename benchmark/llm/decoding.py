"""Decoding for the LLM layer: trie-constrained beam search, free beam search, pooled embeddings.

Constrained beam search (SFT, CFT, BIGRec-style generative recommenders) names catalog items
by generating their text token by token; a token trie over every item's text (plus eos)
allows only continuations that stay inside the catalog, so every result is a real item.

Speed comes from four choices (the naive way is `model.generate(num_beams=...,
prefix_allowed_tokens_fn=...)` over a Python dict trie):
  * the prompt runs ONCE per user (a batch of users, left padded, with position ids that
    skip the padding), not once per beam, and its K/V are kept once per user and attended
    to from every beam (`benchmark.llm.shared_prefix`);
  * the generated part's KV cache lives in preallocated buffers (`kv_cache.BufferedLayer`);
  * the trie is a set of flat tensors on the model's device (`benchmark.llm.trie`), and
    each step gathers the allowed children of every beam at once - no Python per beam or
    per token;
  * seen (excluded) items are pruned inside the search with a sparse per-user correction
    of the "items under this node" counts, and a user stops as soon as no live beam can
    beat its k-th finished item (log-probs only decrease, so this never changes results).

Scores are true sequence log-probabilities: at each step log_softmax over the FULL
vocabulary (the model's own distribution), then only the allowed children are kept; the
score of an item is the sum of its token log-probs including the final eos. This is the
same normalisation as transformers' beam search with prefix_allowed_tokens_fn (its logits
processors run on log-softmaxed scores). No length normalisation by default
(`length_penalty=0.0`); with `length_penalty=a`, finished items are ranked by
score / len**a, as transformers does.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmark.llm.kv_cache import (
    buffered_cache,
    empty_cache_like,
    layers_kv,
    left_pad,
    model_device,
    prefill,
    step as one_step,
)
from benchmark.llm.shared_prefix import SharedPrefix, SharedPromptUnsupported, shared_step
from benchmark.llm.trie import ItemTrie, exclusion_table, lookup

__all__ = [
    "ItemTrie",
    "constrained_beam_search",
    "generate_free",
    "embed_token_ids",
    "reference_constrained_beam_search",
]


# ----------------------------------------------------------------------------- constrained search


log = logging.getLogger(__name__)


def with_fallback(run_batch, shared_prompt: bool):
    """run_batch(shared_prompt) -> result; a model the shared-prompt attention refuses is run
    (from this batch on) with the prompt cache replicated per row. Returns (result, flag)."""
    if not shared_prompt:
        return run_batch(False), False
    try:
        return run_batch(True), True
    except SharedPromptUnsupported as exc:
        log.warning("%s; decoding with the prompt cache copied per beam (shared_prompt=False)", exc)
        return run_batch(False), False


@torch.inference_mode()
def constrained_beam_search(
    model,
    prompt_ids: list[list[int]],
    trie: ItemTrie,
    *,
    num_beams: int,
    k: int,
    exclude: list[np.ndarray] | None,
    pad_id: int,
    batch_size: int = 8,
    progress: bool = True,
    length_penalty: float = 0.0,
    shared_prompt: bool = True,
) -> list[list[tuple[int, float]]]:
    """Top-k distinct catalog items per prompt by trie-constrained beam search.

    Returns, per prompt, up to k (item id, sequence log-prob) pairs, best first (ties by id).
    exclude[i]: item ids never returned for prompt i (seen items); paths leading only to
    excluded items are pruned during the search, so they do not use beam slots.
    With num_beams >= the number of items the search is exhaustive, hence exact.
    length_penalty: 0 ranks by summed log-prob; a > 0 ranks finished items by sum / len**a.
    shared_prompt: keep one copy of each user's prompt K/V and attend to it from all its
    beams through a custom attention function (default; needs a model whose attention
    goes through transformers' AttentionInterface, as Llama/Qwen/Gemma/Mistral do, soft-capping
    and sliding windows included). False replicates the prompt cache per beam and uses the
    model's own attention; a model the shared attention cannot reproduce falls back to it.
    """
    if num_beams < 1 or k < 1:
        raise ValueError("num_beams and k must be >= 1")
    if exclude is not None and len(exclude) != len(prompt_ids):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(prompt_ids)} prompts")
    model.eval()
    device = model_device(model)
    trie = trie.to(device)
    results: list[list[tuple[int, float]]] = [[] for _ in prompt_ids]
    order = np.argsort([-len(p) for p in prompt_ids], kind="stable")  # similar lengths together
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="constrained beam search", disable=not progress):
        out, shared_prompt = with_fallback(
            lambda shared, b=batch: _search_batch(
                model, [prompt_ids[i] for i in b], trie, num_beams, k,
                exclude, [int(i) for i in b], pad_id, device, length_penalty, shared,
            ), shared_prompt)
        for i, res in zip(batch, out):
            results[int(i)] = res
    return results


def _search_batch(model, prompts, trie, nb, k, exclude, rows, pad_id, device, length_penalty,
                  shared_prompt=True):
    """One batch of users. Live beams are kept as flat rows (user, slot), rows of a user
    contiguous; a beam whose score is already below its user's k-th finished item is dropped
    (log-probs only decrease, so it cannot enter the top k), which also ends the search."""
    B = len(prompts)
    ids, pmask = left_pad(prompts, pad_id, device)
    plen = pmask.sum(1)  # [B]
    ex_keys, ex_counts = exclusion_table(trie, exclude, rows)
    N = trie.n_nodes
    neg = -math.inf
    bound_div = float(trie.max_depth) ** length_penalty if length_penalty else 1.0

    logp, prefill_cache = prefill(model, ids, pmask)
    # live rows: user, slot within the user's beam, trie node, score
    row_user = torch.arange(B, device=device)
    row_slot = torch.zeros(B, dtype=torch.long, device=device)
    node = torch.zeros(B, dtype=torch.long, device=device)
    score = torch.zeros(B, device=device)
    width = 1  # slots per user in the previous step
    cache = None
    mask = pmask
    # best finished leaves per user: raw log-prob, ranking score, leaf node, [B, k]
    fin_score = torch.full((B, k), neg, device=device)
    fin_rank = torch.full((B, k), neg, device=device)
    fin_leaf = torch.full((B, k), -1, dtype=torch.long, device=device)
    step = 0
    while True:
        step += 1
        R = node.shape[0]
        # children of every live row: a contiguous node range
        cnt = trie.n_children[node]
        C = int(cnt.max())
        j = torch.arange(C, device=device)
        child = trie.first_child[node][:, None] + j  # [R, C]
        valid = j < cnt[:, None]
        child = torch.where(valid, child, torch.zeros_like(child))
        under = trie.n_under[child] - lookup(ex_keys, ex_counts, row_user[:, None] * N + child)
        valid &= under > 0
        tok = trie.token[child].clamp(min=0)
        cand_rows = torch.where(valid, score[:, None] + logp.gather(1, tok), torch.full(tok.shape, neg, device=device))
        # dense per-user view [B, width * C]
        cand = torch.full((B, width, C), neg, device=device)
        cand[row_user, row_slot] = cand_rows
        kids = torch.zeros((B, width, C), dtype=torch.long, device=device)
        kids[row_user, row_slot] = child
        cand, kids = cand.view(B, width * C), kids.view(B, width * C)
        is_leaf = trie.n_children[kids] == 0

        # finished items: merge this step's best leaves into the per-user top k
        leaf_scores = torch.where(is_leaf, cand, torch.full_like(cand, neg))
        s_new, i_new = leaf_scores.topk(min(k, width * C), dim=1)
        leaf_new = torch.where(s_new > neg, kids.gather(1, i_new), torch.full_like(i_new, -1))
        r_new = s_new / float(step) ** length_penalty if length_penalty else s_new
        all_rank = torch.cat([fin_rank, r_new], 1)
        fin_rank, top_i = all_rank.topk(k, dim=1)
        fin_score = torch.cat([fin_score, s_new], 1).gather(1, top_i)
        fin_leaf = torch.cat([fin_leaf, leaf_new], 1).gather(1, top_i)

        # live beams: the best non-leaf continuations that can still reach the top k
        kth = fin_rank[:, -1:]
        cont = torch.where(is_leaf | (cand / bound_div < kth), torch.full_like(cand, neg), cand)
        new_score, sel = cont.topk(min(nb, width * C), dim=1)
        live = new_score > neg
        if not bool(live.any()):
            break
        users, slots = torch.nonzero(live, as_tuple=True)
        parent_slot = sel[users, slots] // C
        # row index of (user, parent slot) in the current row order
        row_of = torch.full((B, width), -1, dtype=torch.long, device=device)
        row_of[row_user, row_slot] = torch.arange(R, device=device)
        parent_row = row_of[users, parent_slot]
        new_node = kids[users, sel[users, slots]]

        if cache is None:
            if shared_prompt:
                shared = SharedPrefix(layers_kv(prefill_cache), pmask)
                cache = empty_cache_like(layers_kv(prefill_cache), parent_row.shape[0], trie.max_depth + 1)
            else:
                cache = buffered_cache(
                    [(kk_.index_select(0, parent_row), vv_.index_select(0, parent_row))
                     for kk_, vv_ in layers_kv(prefill_cache)],
                    1, trie.max_depth + 1,
                )
            del prefill_cache
        else:
            for layer in cache.layers:
                layer.select_rows(parent_row)
        row_user, row_slot, node, score = users, slots, new_node, new_score[users, slots]
        width = new_score.shape[1]
        positions = plen[row_user] + (step - 1)
        if shared_prompt:
            shared.place(row_user, row_slot, width)
            logp = shared_step(model, one_step, shared, cache, trie.token[node], None, positions)
        else:
            mask = torch.cat([mask.index_select(0, parent_row),
                              torch.ones((parent_row.shape[0], 1), dtype=mask.dtype, device=device)], 1)
            logp = one_step(model, cache, trie.token[node], mask, positions)

    # leaves -> items (duplicates expand to all their ids; excluded ids dropped)
    fs, fl = fin_rank.cpu().numpy(), fin_leaf.cpu().numpy()
    raw = fin_score.cpu().numpy()
    out = []
    for r in range(B):
        ex = set()
        if exclude is not None:
            ex = {int(x) for x in np.asarray(exclude[rows[r]]).reshape(-1)}
        items = []
        for s, s_raw, leaf in zip(fs[r], raw[r], fl[r]):
            if leaf < 0 or not np.isfinite(s):
                continue
            for it in trie.items_at(int(leaf)):
                if int(it) not in ex:
                    items.append((float(s), int(it), float(s_raw)))
        items.sort(key=lambda x: (-x[0], x[1]))
        out.append([(it, s_raw) for _, it, s_raw in items[:k]])
    return out


# ----------------------------------------------------------------------------- free generation


@torch.inference_mode()
def generate_free(
    model,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    num_beams: int,
    pad_id: int,
    eos_id: int,
    batch_size: int = 8,
    progress: bool = True,
    length_penalty: float = 1.0,
    shared_prompt: bool = True,
    min_new_tokens: int = 0,
) -> list[list[list[int]]]:
    """Unconstrained beam search (BIGRec-style generation before grounding).

    Returns per prompt num_beams token-id lists (eos stripped), best first. Finished
    hypotheses are ranked by sum log-prob / len**length_penalty (len counts eos), with
    length_penalty=1.0 as transformers' default; hypotheses still running after
    max_new_tokens are finished there. A prompt stops once it has num_beams finished
    hypotheses and its best running beam (normalised at the current length, transformers'
    default heuristic) cannot beat the worst of them. shared_prompt: as in
    `constrained_beam_search`. min_new_tokens: eos is impossible before that many new
    tokens (transformers' MinNewTokensLengthLogitsProcessor).
    """
    model.eval()
    device = model_device(model)
    results: list[list[list[int]]] = [[] for _ in prompt_ids]
    order = np.argsort([-len(p) for p in prompt_ids], kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="beam search", disable=not progress):
        out, shared_prompt = with_fallback(
            lambda shared, b=batch: _free_batch(model, [prompt_ids[i] for i in b], max_new_tokens, num_beams,
                                                pad_id, eos_id, device, length_penalty, shared, min_new_tokens),
            shared_prompt)
        for i, res in zip(batch, out):
            results[int(i)] = res
    return results


def _free_batch(model, prompts, max_new, nb, pad_id, eos_id, device, lp, shared_prompt=True, min_new=0):
    B = len(prompts)
    ids, pmask = left_pad(prompts, pad_id, device)
    P = ids.shape[1]
    plen = pmask.sum(1)
    neg = -math.inf
    logp, prefill_cache = prefill(model, ids, pmask)
    V = logp.shape[1]
    if shared_prompt:
        shared = SharedPrefix(layers_kv(prefill_cache), pmask)
        cache = empty_cache_like(layers_kv(prefill_cache), B * nb, max_new + 1)
        shared.place(torch.arange(B, device=device).repeat_interleave(nb), torch.arange(nb, device=device).repeat(B), nb)
        tail_start = 0
    else:
        cache = buffered_cache(layers_kv(prefill_cache), nb, max_new + 1)
        tail_start = P
    del prefill_cache
    mask = pmask.repeat_interleave(nb, 0)
    logp = logp.repeat_interleave(nb, 0)
    score = torch.full((B, nb), neg, device=device)
    score[:, 0] = 0.0  # identical beams at the start: only the first one is live
    seqs = torch.zeros((B, nb, 0), dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    for step in range(1, max_new + 1):
        if step <= min_new:
            logp[:, eos_id] = neg
        cand = (score[..., None] + logp.view(B, nb, V)).view(B, nb * V)
        top_s, top_i = cand.topk(2 * nb, dim=1)
        top_tok = top_i % V
        top_beam = top_i // V
        is_eos = top_tok == eos_id
        # finished: eos among the top nb candidates (as transformers)
        rank_ok = torch.arange(2 * nb, device=device)[None, :] < nb
        fin = (is_eos & rank_ok & (top_s > neg)).cpu().numpy()
        if fin.any():
            ts, tb = top_s.cpu().numpy(), top_beam.cpu().numpy()
            seq_cpu = seqs.cpu().numpy()
            for b, c in zip(*np.nonzero(fin)):
                if not done[b]:
                    finished[b].append((float(ts[b, c]) / step**lp, seq_cpu[b, tb[b, c]].tolist()))
        cont = torch.where(is_eos, torch.full_like(top_s, neg), top_s)
        new_score, sel = cont.topk(nb, dim=1)
        parent = top_beam.gather(1, sel)
        new_tok = top_tok.gather(1, sel)
        seqs = torch.cat([seqs.gather(1, parent[..., None].expand(-1, -1, seqs.shape[2])), new_tok[..., None]], 2)
        score = new_score
        best = score[:, 0].cpu().numpy()
        for b in range(B):
            if done[b] or len(finished[b]) < nb:
                continue
            worst = sorted(s for s, _ in finished[b])[-nb]
            if not np.isfinite(best[b]) or best[b] / step**lp < worst:
                done[b] = True
        if done.all() or step == max_new:
            break
        src = (torch.arange(B, device=device)[:, None] * nb + parent).view(-1)
        for layer in cache.layers:
            layer.reorder_tail(src, tail_start)
        tokens = torch.where(score > neg, new_tok, torch.full_like(new_tok, int(pad_id))).view(-1)
        positions = (plen[:, None] + (step - 1)).expand(B, nb).reshape(-1)
        if shared_prompt:
            logp = shared_step(model, one_step, shared, cache, tokens, None, positions)
        else:
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], 1)
            logp = one_step(model, cache, tokens, mask, positions)
    # running beams of unfinished prompts end at the length limit
    sc, sq = score.cpu().numpy(), seqs.cpu().numpy()
    out = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:
            length = sq.shape[2]
            hyps += [(float(sc[b, j]) / max(length, 1) ** lp, sq[b, j].tolist())
                     for j in range(nb) if np.isfinite(sc[b, j])]
        hyps.sort(key=lambda h: -h[0])
        out.append([h[1] for h in hyps[:nb]])
    return out


# ----------------------------------------------------------------------------- embeddings


@torch.inference_mode()
def embed_token_ids(
    model,
    ids: list[list[int]],
    *,
    pooling: str = "last",
    pad_id: int,
    batch_size: int = 32,
    progress: bool = True,
) -> torch.Tensor:
    """Pooled last-layer hidden states [n, hidden] (float32, CPU), padding excluded.

    pooling="last": the state at each sequence's last token (BIGRec's
    `hidden_states[-1][:, -1]`, with left padding); "mean": the mean over real tokens.
    """
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
    model.eval()
    device = model_device(model)
    order = np.argsort([-len(s) for s in ids], kind="stable")
    out: list[torch.Tensor | None] = [None] * len(ids)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="embed", disable=not progress):
        x, m = left_pad([list(ids[i]) for i in batch], pad_id, device)
        pos = (m.cumsum(1) - 1).clamp_(min=0)
        res = model(input_ids=x, attention_mask=m, position_ids=pos,
                    output_hidden_states=True, use_cache=False, logits_to_keep=1)
        h = res.hidden_states[-1].float()
        if pooling == "last":
            pooled = h[:, -1, :]
        else:
            mf = m.to(h.dtype)[..., None]
            pooled = (h * mf).sum(1) / mf.sum(1)
        for i, row in zip(batch, pooled.cpu()):
            out[int(i)] = row
    if not ids:
        return torch.zeros((0, model.config.hidden_size))
    return torch.stack(out)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- reference (slow)


def _dict_trie(item_token_ids: list[list[int]], eos_id: int) -> dict:
    root: dict = {}
    for seq in item_token_ids:
        node = root
        for t in list(seq) + [eos_id]:
            node = node.setdefault(int(t), {})
    return root


@torch.inference_mode()
def reference_constrained_beam_search(
    model,
    prompt_ids: list[list[int]],
    item_token_ids: list[list[int]],
    *,
    num_beams: int,
    num_return: int,
    eos_id: int,
    pad_id: int,
    batch_size: int = 8,
    progress: bool = False,
) -> list[list[tuple[list[int], float]]]:
    """The naive baseline: transformers `generate` with prefix_allowed_tokens_fn over a dict trie.

    Kept for tests and the benchmark (bench/bench_decoding.py); slow. Returns, per prompt,
    (generated token ids without eos, sequence log-prob) for the returned beams, best first.
    length_penalty=0 so scores are comparable to `constrained_beam_search`.
    """
    model.eval()
    device = model_device(model)
    root = _dict_trie(item_token_ids, eos_id)
    depth = max(len(s) for s in item_token_ids) + 1
    out: list[list[tuple[list[int], float]]] = []
    for start in tqdm(range(0, len(prompt_ids), batch_size), disable=not progress, desc="naive"):
        chunk = prompt_ids[start : start + batch_size]
        ids, m = left_pad(chunk, pad_id, device)
        width = ids.shape[1]

        def allowed(batch_id, input_ids, _w=width):
            node = root
            for t in input_ids[_w:].tolist():
                node = node.get(t)
                if node is None:
                    return [eos_id]
            return list(node.keys()) or [eos_id]

        gen = model.generate(
            input_ids=ids, attention_mask=m, num_beams=num_beams, num_return_sequences=num_return,
            max_new_tokens=depth, prefix_allowed_tokens_fn=allowed, do_sample=False,
            length_penalty=0.0, pad_token_id=pad_id, eos_token_id=eos_id,
            output_scores=True, return_dict_in_generate=True,
        )
        seqs = gen.sequences[:, width:].tolist()
        scores = gen.sequences_scores.tolist()
        for b in range(len(chunk)):
            res = []
            for j in range(num_return):
                s = seqs[b * num_return + j]
                if eos_id in s:
                    s = s[: s.index(eos_id)]
                res.append((s, scores[b * num_return + j]))
            out.append(res)
    return out
