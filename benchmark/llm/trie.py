"""A token trie over catalog item texts, as flat tensors, and the per-user exclusion table.

Used by trie-constrained beam search (`benchmark.llm.decoding`): nodes are numbered
breadth-first so the children of a node are a contiguous id range, and each search step
gathers the allowed children of every beam at once (no Python per beam or per token).
Seen (excluded) items are pruned with a sparse per-user correction of the "items under
this node" counts (`exclusion_table`, `lookup`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ItemTrie", "exclusion_table", "lookup"]


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
        return dataclasses.replace(self, token=self.token.to(dev), first_child=self.first_child.to(dev),
                                   n_children=self.n_children.to(dev), n_under=self.n_under.to(dev), device=dev)

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


def exclusion_table(trie: ItemTrie, exclude: list[np.ndarray] | None, rows: list[int]):
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


def lookup(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    if keys.numel() == 0:
        return torch.zeros_like(query)
    pos = torch.searchsorted(keys, query).clamp_(max=keys.numel() - 1)
    return torch.where(keys[pos] == query, values[pos], torch.zeros_like(query))

