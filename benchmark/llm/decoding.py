"""Decoding for the LLM layer: trie-constrained beam search, free beam search, pooled embeddings.

Constrained beam search (SFT, CFT, BIGRec-style generative recommenders) names catalog items
by generating their text token by token; a token trie over every item's text (plus eos)
allows only continuations that stay inside the catalog, so every result is a real item.

Speed comes from four choices (the naive way is `model.generate(num_beams=...,
prefix_allowed_tokens_fn=...)` over a Python dict trie):
  * the prompt runs ONCE per user (a batch of users, left padded, with position ids that
    skip the padding), not once per beam;
  * the KV cache lives in preallocated buffers (`_BufferedLayer`); the prompt part of all
    beams of one user is identical, so reordering beams only moves the generated part;
  * the trie is a set of flat tensors on the model's device (nodes in breadth-first order,
    so the children of a node are a contiguous id range), and each step gathers the
    allowed children of every beam at once - no Python per beam or per token;
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

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = [
    "ItemTrie",
    "constrained_beam_search",
    "generate_free",
    "embed_token_ids",
    "reference_constrained_beam_search",
]


# ----------------------------------------------------------------------------- trie


@dataclass
class ItemTrie:
    """Token trie over item texts, as flat tensors.

    Nodes are numbered breadth-first, and within a level by (parent, token), so the children
    of node n are the nodes first_child[n] .. first_child[n] + n_children[n] - 1 and the
    token that leads to node c is token[c]. Every item's path ends with eos; the node after
    eos is a leaf (no children) and owns the item ids leaf_items[leaf_start[l]:leaf_start[l+1]]
    (in id order; several ids where texts are duplicates). `n_under[n]` counts item ids
    below node n (duplicates counted), which drives the pruning of excluded items.
    """

    token: torch.Tensor  # int64 [N]; token[0] (root) is -1
    parent: np.ndarray  # int64 [N]; parent[0] = -1 (kept on CPU: only used to build exclusions)
    first_child: torch.Tensor  # int64 [N]
    n_children: torch.Tensor  # int64 [N]
    n_under: torch.Tensor  # int64 [N]
    item_leaf: np.ndarray  # int64 [max item id + 1]: leaf node of each item, -1 if not in the trie
    leaf_ids: np.ndarray  # int64 [L] leaf node ids, sorted
    leaf_start: np.ndarray  # int64 [L + 1] CSR into leaf_items
    leaf_items: np.ndarray  # int64, item ids grouped by leaf, id order inside a leaf
    eos_id: int
    max_depth: int  # longest path (tokens, eos included)
    item_token_ids: dict[int, list[int]]  # kept for restrict()
    device: torch.device

    @property
    def n_nodes(self) -> int:
        return int(self.token.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.leaf_items.shape[0])

    @classmethod
    def build(
        cls,
        item_token_ids: list[list[int]],
        eos_id: int,
        device: str | torch.device = "cpu",
        item_ids: list[int] | np.ndarray | None = None,
    ) -> ItemTrie:
        """Build from each item's response token ids (WITHOUT eos; it is appended here).

        item_ids: the catalog id of each sequence (default 0..n-1); used by `restrict`.
        """
        n = len(item_token_ids)
        ids = np.arange(n, dtype=np.int64) if item_ids is None else np.asarray(item_ids, dtype=np.int64)
        if ids.shape[0] != n:
            raise ValueError(f"item_ids has {ids.shape[0]} entries for {n} token sequences")
        if n == 0:
            raise ValueError("ItemTrie.build needs at least one item")
        seqs = [list(map(int, s)) + [int(eos_id)] for s in item_token_ids]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        depth = int(lengths.max())
        mat = np.full((n, depth), -1, dtype=np.int64)
        for i, s in enumerate(seqs):
            mat[i, : len(s)] = s
        vocab = int(mat.max()) + 2

        # Level by level: a node is a unique (parent node, token) pair; np.unique sorts the
        # pairs, which gives the breadth-first numbering with contiguous children.
        tokens, parents = [np.array([-1], dtype=np.int64)], [np.array([-1], dtype=np.int64)]
        node_of = np.zeros(n, dtype=np.int64)  # current node of each item
        n_nodes = 1
        for d in range(depth):
            rows = np.nonzero(lengths > d)[0]
            keys = node_of[rows] * vocab + mat[rows, d]
            uniq, inverse = np.unique(keys, return_inverse=True)
            parents.append(uniq // vocab)
            tokens.append(uniq % vocab)
            node_of[rows] = n_nodes + inverse.reshape(-1)
            n_nodes += uniq.shape[0]
        token = np.concatenate(tokens)
        parent = np.concatenate(parents)
        n_children = np.bincount(parent[1:], minlength=n_nodes).astype(np.int64)
        first_child = np.zeros(n_nodes, dtype=np.int64)
        # children of node p start right after all children of nodes < p (node 1 is root's first)
        first_child[:] = 1 + np.concatenate([[0], np.cumsum(n_children)[:-1]])
        if (n_children[node_of] != 0).any():
            raise ValueError(
                "an item's token ids contain eos_id in the middle; strip eos from item texts"
            )
        leaf = node_of  # every item ends on the node after its eos

        n_under = np.zeros(n_nodes, dtype=np.int64)
        np.add.at(n_under, leaf, 1)
        bounds = np.cumsum([0] + [t.shape[0] for t in tokens])  # node id range of each level
        for lo, hi in reversed(list(zip(bounds[1:-1], bounds[2:]))):  # deepest level first
            np.add.at(n_under, parent[lo:hi], n_under[lo:hi])

        order = np.lexsort((ids, leaf))
        leaf_sorted = leaf[order]
        leaf_ids, starts = np.unique(leaf_sorted, return_index=True)
        leaf_start = np.concatenate([starts, [n]]).astype(np.int64)
        item_leaf = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
        item_leaf[ids] = leaf
        dev = torch.device(device)
        return cls(
            token=torch.as_tensor(token, device=dev),
            parent=parent,
            first_child=torch.as_tensor(first_child, device=dev),
            n_children=torch.as_tensor(n_children, device=dev),
            n_under=torch.as_tensor(n_under, device=dev),
            item_leaf=item_leaf,
            leaf_ids=leaf_ids.astype(np.int64),
            leaf_start=leaf_start,
            leaf_items=ids[order],
            eos_id=int(eos_id),
            max_depth=depth,
            item_token_ids={int(i): list(map(int, s)) for i, s in zip(ids, item_token_ids)},
            device=dev,
        )

    def restrict(self, allowed_items) -> ItemTrie:
        """A trie over a subset of the items (sampled / retrieved candidate sets); ids unchanged."""
        allowed = sorted({int(i) for i in np.asarray(allowed_items).reshape(-1) if int(i) >= 0})
        missing = [i for i in allowed if i not in self.item_token_ids]
        if missing:
            raise ValueError(f"restrict: items {missing[:5]} are not in this trie")
        return ItemTrie.build(
            [self.item_token_ids[i] for i in allowed], self.eos_id, self.device, item_ids=allowed
        )

    def to(self, device) -> ItemTrie:
        dev = torch.device(device)
        if dev == self.device:
            return self
        return ItemTrie(
            token=self.token.to(dev),
            parent=self.parent,
            first_child=self.first_child.to(dev),
            n_children=self.n_children.to(dev),
            n_under=self.n_under.to(dev),
            item_leaf=self.item_leaf,
            leaf_ids=self.leaf_ids,
            leaf_start=self.leaf_start,
            leaf_items=self.leaf_items,
            eos_id=self.eos_id,
            max_depth=self.max_depth,
            item_token_ids=self.item_token_ids,
            device=dev,
        )

    def items_at(self, leaf: int) -> np.ndarray:
        pos = int(np.searchsorted(self.leaf_ids, leaf))
        if pos >= len(self.leaf_ids) or self.leaf_ids[pos] != leaf:
            raise KeyError(f"node {leaf} is not a leaf")
        return self.leaf_items[self.leaf_start[pos] : self.leaf_start[pos + 1]]

    def allowed_tokens(self, prefix: list[int]) -> list[int]:
        """Tokens allowed after `prefix` (for the reference implementation and debugging)."""
        node = 0
        tok = self.token.cpu().numpy()
        first = self.first_child.cpu().numpy()
        cnt = self.n_children.cpu().numpy()
        for t in prefix:
            kids = range(first[node], first[node] + cnt[node])
            nxt = [c for c in kids if tok[c] == t]
            if not nxt:
                return []
            node = nxt[0]
        return [int(tok[c]) for c in range(first[node], first[node] + cnt[node])]


def _exclusion_table(trie: ItemTrie, exclude: list[np.ndarray] | None, rows: list[int]):
    """Sparse per-user correction of n_under: sorted keys (row * N + node) and counts.

    For each user, every excluded item subtracts 1 from the nodes on its root-to-leaf path;
    a node whose corrected count is 0 leads only to excluded items and is pruned.
    """
    n_nodes = trie.n_nodes
    keys = []
    if exclude is not None:
        for r, u in enumerate(rows):
            ex = np.asarray(exclude[u], dtype=np.int64).reshape(-1)
            ex = ex[(ex >= 0) & (ex < trie.item_leaf.shape[0])]
            if ex.size == 0:
                continue
            nodes = trie.item_leaf[np.unique(ex)]
            nodes = nodes[nodes >= 0]
            while nodes.size:
                keys.append(r * n_nodes + nodes)
                nodes = trie.parent[nodes]
                nodes = nodes[nodes > 0]  # the root is never pruned through this table
    if not keys:
        empty = torch.zeros(0, dtype=torch.long, device=trie.device)
        return empty, empty
    uniq, counts = np.unique(np.concatenate(keys), return_counts=True)
    return (
        torch.as_tensor(uniq, device=trie.device),
        torch.as_tensor(counts.astype(np.int64), device=trie.device),
    )


def _lookup(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    if keys.numel() == 0:
        return torch.zeros_like(query)
    pos = torch.searchsorted(keys, query).clamp_(max=keys.numel() - 1)
    return torch.where(keys[pos] == query, values[pos], torch.zeros_like(query))


# ----------------------------------------------------------------------------- KV cache


class _BufferedLayer(DynamicLayer):
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

    def lazy_initialization(self, key_states, value_states):  # already initialised
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


def _layers_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # older transformers


def _buffered_cache(pairs, expand: int, extra: int) -> DynamicCache:
    """A DynamicCache of _BufferedLayer from per-layer (keys, values), rows repeated `expand` times."""
    cache = DynamicCache()
    layers = []
    for k, v in pairs:
        if expand > 1:
            k = k.repeat_interleave(expand, dim=0)
            v = v.repeat_interleave(expand, dim=0)
        layers.append(_BufferedLayer(k, v, k.shape[2] + extra))
    cache.layers = layers
    cache.layer_class_to_replicate = None
    return cache


# ----------------------------------------------------------------------------- shared-prompt attention

_SHARED_ATTN = "benchmark_shared_prefix"


class _SharedPrefix:
    """Prompt K/V of each user, shared by all that user's beams (never copied per beam).

    Passed to the model's forward as the `shared_prefix` keyword; transformers hands it on
    to the attention function, which attends to the user's prompt part (grouped per user,
    as one matmul per user and kv head) and to the row's own generated part (the cache).
    """

    def __init__(self, pairs, prompt_mask: torch.Tensor):
        self.keys = [k for k, _ in pairs]
        self.values = [v for _, v in pairs]
        dtype = self.keys[0].dtype
        self.bias = ((1 - prompt_mask.to(dtype)) * torch.finfo(dtype).min)[:, None, None, :]
        self.row_user = self.row_slot = None
        self.width = 1
        self.calls = 0


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctx = kwargs.pop("shared_prefix", None)
    if ctx is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    ctx.calls += 1
    R, H, q, D = query.shape  # q == 1 (one new token per beam)
    pk, pv = ctx.keys[module.layer_idx], ctx.values[module.layer_idx]
    B, Hkv, P, _ = pk.shape
    g, W = H // Hkv, ctx.width
    scale = scaling if scaling is not None else D**-0.5
    qr = query.reshape(R, Hkv, g, D)
    # prompt part: scatter rows into [B, W] slots, one matmul per (user, kv head)
    qd = query.new_zeros((B, W, Hkv, g, D))
    qd[ctx.row_user, ctx.row_slot] = qr
    qd = qd.permute(0, 2, 1, 3, 4).reshape(B, Hkv, W * g, D)
    sp = torch.matmul(qd, pk.transpose(-1, -2)) * scale + ctx.bias  # [B, Hkv, W*g, P]
    sp = sp.view(B, Hkv, W, g, P).permute(0, 2, 1, 3, 4)[ctx.row_user, ctx.row_slot]  # [R, Hkv, g, P]
    sg = torch.matmul(qr, key.transpose(-1, -2)) * scale  # [R, Hkv, g, t]
    w = torch.softmax(torch.cat([sp, sg], -1).float(), -1).to(query.dtype)
    wp, wg = w[..., :P], w[..., P:]
    wd = wp.new_zeros((B, W, Hkv, g, P))
    wd[ctx.row_user, ctx.row_slot] = wp
    wd = wd.permute(0, 2, 1, 3, 4).reshape(B, Hkv, W * g, P)
    op = torch.matmul(wd, pv).view(B, Hkv, W, g, D).permute(0, 2, 1, 3, 4)[ctx.row_user, ctx.row_slot]
    out = op + torch.matmul(wg, value)  # [R, Hkv, g, D]
    return out.reshape(R, 1, H, D), None


def _register_shared_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(_SHARED_ATTN, _shared_prefix_attention)
    AttentionMaskInterface.register(_SHARED_ATTN, lambda *args, **kwargs: None)


class _attn_implementation:
    """Temporarily switch the model's attention implementation (restored on exit)."""

    def __init__(self, model, name: str | None):
        self.config, self.name = model.config, name

    def __enter__(self):
        self.old = getattr(self.config, "_attn_implementation", None)
        if self.name is not None:
            _register_shared_attention()
            self.config._attn_implementation = self.name
        return self

    def __exit__(self, *exc):
        if self.name is not None:
            self.config._attn_implementation = self.old
        return False


# ----------------------------------------------------------------------------- batching helpers


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("empty prompt")
        ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _prefill(model, ids: torch.Tensor, mask: torch.Tensor):
    """Run the prompts once; return last-position log-probs [B, V] (float32) and the cache."""
    pos = (mask.cumsum(1) - 1).clamp_(min=0)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        past_key_values=DynamicCache(),
        use_cache=True,
        logits_to_keep=1,
    )
    logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
    return logp, out.past_key_values


def _step(model, cache, tokens: torch.Tensor, mask, positions: torch.Tensor, **kwargs):
    out = model(
        input_ids=tokens[:, None],
        attention_mask=mask,
        position_ids=positions[:, None],
        past_key_values=cache,
        use_cache=True,
        **kwargs,
    )
    return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)


# ----------------------------------------------------------------------------- constrained search


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
    goes through transformers' AttentionInterface, as Llama/Qwen/Gemma/Mistral do). False
    replicates the prompt cache per beam and uses the model's own attention.
    """
    if num_beams < 1 or k < 1:
        raise ValueError("num_beams and k must be >= 1")
    if exclude is not None and len(exclude) != len(prompt_ids):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(prompt_ids)} prompts")
    model.eval()
    device = _model_device(model)
    trie = trie.to(device)
    results: list[list[tuple[int, float]]] = [[] for _ in prompt_ids]
    order = np.argsort([-len(p) for p in prompt_ids], kind="stable")  # similar lengths together
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="constrained beam search", disable=not progress):
        out = _search_batch(
            model, [prompt_ids[i] for i in batch], trie, num_beams, k,
            exclude, [int(i) for i in batch], pad_id, device, length_penalty, shared_prompt,
        )
        for i, res in zip(batch, out):
            results[int(i)] = res
    return results


def _search_batch(model, prompts, trie, nb, k, exclude, rows, pad_id, device, length_penalty,
                  shared_prompt=True):
    """One batch of users. Live beams are kept as flat rows (user, slot), rows of a user
    contiguous; a beam whose score is already below its user's k-th finished item is dropped
    (log-probs only decrease, so it cannot enter the top k), which also ends the search."""
    B = len(prompts)
    ids, pmask = _left_pad(prompts, pad_id, device)
    plen = pmask.sum(1)  # [B]
    ex_keys, ex_counts = _exclusion_table(trie, exclude, rows)
    N = trie.n_nodes
    neg = -math.inf
    bound_div = float(trie.max_depth) ** length_penalty if length_penalty else 1.0

    logp, prefill_cache = _prefill(model, ids, pmask)
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
        under = trie.n_under[child] - _lookup(ex_keys, ex_counts, row_user[:, None] * N + child)
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
                shared = _SharedPrefix(_layers_kv(prefill_cache), pmask)
                kv0 = shared.keys[0]
                empty = kv0.new_empty((parent_row.shape[0], kv0.shape[1], 0, kv0.shape[3]))
                cache = _buffered_cache([(empty, empty)] * len(shared.keys), 1, trie.max_depth + 1)
            else:
                cache = _buffered_cache(
                    [(kk_.index_select(0, parent_row), vv_.index_select(0, parent_row))
                     for kk_, vv_ in _layers_kv(prefill_cache)],
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
            shared.row_user, shared.row_slot, shared.width = row_user, row_slot, width
            with _attn_implementation(model, _SHARED_ATTN):
                logp = _step(model, cache, trie.token[node], None, positions, shared_prefix=shared)
            if shared.calls == 0:
                raise RuntimeError(
                    "this model's attention does not go through transformers' AttentionInterface; "
                    "call constrained_beam_search(..., shared_prompt=False)"
                )
        else:
            mask = torch.cat([mask.index_select(0, parent_row),
                              torch.ones((parent_row.shape[0], 1), dtype=mask.dtype, device=device)], 1)
            logp = _step(model, cache, trie.token[node], mask, positions)

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
    device = _model_device(model)
    results: list[list[list[int]]] = [[] for _ in prompt_ids]
    order = np.argsort([-len(p) for p in prompt_ids], kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="beam search", disable=not progress):
        out = _free_batch(model, [prompt_ids[i] for i in batch], max_new_tokens, num_beams,
                          pad_id, eos_id, device, length_penalty, shared_prompt, min_new_tokens)
        for i, res in zip(batch, out):
            results[int(i)] = res
    return results


def _free_batch(model, prompts, max_new, nb, pad_id, eos_id, device, lp, shared_prompt=True, min_new=0):
    B = len(prompts)
    ids, pmask = _left_pad(prompts, pad_id, device)
    P = ids.shape[1]
    plen = pmask.sum(1)
    neg = -math.inf
    logp, prefill_cache = _prefill(model, ids, pmask)
    V = logp.shape[1]
    if shared_prompt:
        shared = _SharedPrefix(_layers_kv(prefill_cache), pmask)
        kv0 = shared.keys[0]
        empty = kv0.new_empty((B * nb, kv0.shape[1], 0, kv0.shape[3]))
        cache = _buffered_cache([(empty, empty)] * len(shared.keys), 1, max_new + 1)
        shared.row_user = torch.arange(B, device=device).repeat_interleave(nb)
        shared.row_slot = torch.arange(nb, device=device).repeat(B)
        shared.width = nb
        tail_start = 0
    else:
        cache = _buffered_cache(_layers_kv(prefill_cache), nb, max_new + 1)
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
            with _attn_implementation(model, _SHARED_ATTN):
                logp = _step(model, cache, tokens, None, positions, shared_prefix=shared)
            if shared.calls == 0:
                raise RuntimeError(
                    "this model's attention does not go through transformers' AttentionInterface; "
                    "call generate_free(..., shared_prompt=False)"
                )
        else:
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], 1)
            logp = _step(model, cache, tokens, mask, positions)
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
    device = _model_device(model)
    order = np.argsort([-len(s) for s in ids], kind="stable")
    out: list[torch.Tensor | None] = [None] * len(ids)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="embed", disable=not progress):
        x, m = _left_pad([list(ids[i]) for i in batch], pad_id, device)
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
    device = _model_device(model)
    root = _dict_trie(item_token_ids, eos_id)
    depth = max(len(s) for s in item_token_ids) + 1
    out: list[list[tuple[list[int], float]]] = []
    for start in tqdm(range(0, len(prompt_ids), batch_size), disable=not progress, desc="naive"):
        chunk = prompt_ids[start : start + batch_size]
        ids, m = _left_pad(chunk, pad_id, device)
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
