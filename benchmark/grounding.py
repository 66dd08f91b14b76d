"""Grounding: map generated text (or its embedding) to catalog item ids.

Generative methods that decode freely (BIGRec, the free-generation variants of SFT/CFT)
name items in text that may not exist. Two ways back to catalog ids:

* `ground_exact`: a generation names an item when its normalised text equals the item's
  normalised text; duplicate titles name every matching id (in id order).
* `ground_l2` (BIGRec): embed each generation and every item text with the same LLM
  (`benchmark.llm.decoding.embed_token_ids`) and rank all items by L2 distance; with several
  beams, interleave the per-beam rankings round-robin, de-duplicated (as CFT's eval_acc_2).

Seen items (`exclude`) are never returned. Results are top-k id arrays per user, possibly
shorter than k; callers pad with PAD where they build RankedLists.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "normalize_text",
    "title_index",
    "ground_exact",
    "ground_l2",
    "interleave_round_robin",
]

_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Unicode NFKC, lower case, surrounding quotes/space stripped, inner whitespace collapsed."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = _SPACE.sub(" ", text).strip()
    return text.strip("\"'").strip()


def title_index(catalog_texts: Sequence[str]) -> dict[str, list[int]]:
    """Normalised text -> every catalog id with that text, in id order."""
    index: dict[str, list[int]] = {}
    for item, text in enumerate(catalog_texts):
        index.setdefault(normalize_text(text), []).append(item)
    return index


def _exclude_set(exclude, row: int) -> set[int]:
    if exclude is None:
        return set()
    return {int(x) for x in np.asarray(exclude[row]).reshape(-1)}


def interleave_round_robin(
    lists: Sequence[Sequence[int]], k: int, exclude: Iterable[int] = frozenset()
) -> list[int]:
    """Round-robin merge: list0[0], list1[0], ..., list0[1], list1[1], ...

    Skips repeats and excluded ids; stops at k ids or when every list is exhausted.
    """
    excluded = set(int(x) for x in exclude)
    seen: set[int] = set()
    out: list[int] = []
    longest = max((len(x) for x in lists), default=0)
    for pos in range(longest):
        for lst in lists:
            if pos >= len(lst):
                continue
            item = int(lst[pos])
            if item in seen or item in excluded:
                continue
            seen.add(item)
            out.append(item)
            if len(out) >= k:
                return out
    return out


def ground_exact(
    texts: Sequence[Sequence[str]],
    catalog_texts: Sequence[str] | dict[str, list[int]],
    *,
    k: int,
    exclude: Sequence[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Exact-match grounding of generated texts (per user, per beam, best beam first).

    Ranked ids: the items named by the beams in beam order (a duplicate title contributes
    all its ids, in id order), de-duplicated, excluded ids dropped, at most k.
    valid[u] = 1.0 when the user's top beam names a real catalog item (whether or not it
    was excluded), else 0.0. `catalog_texts` may be a prebuilt `title_index`.
    """
    index = catalog_texts if isinstance(catalog_texts, dict) else title_index(catalog_texts)
    ranked: list[np.ndarray] = []
    valid = np.zeros(len(texts), dtype=np.float64)
    for u, beams in enumerate(texts):
        named = [index.get(normalize_text(t), []) for t in beams]
        if named and named[0]:
            valid[u] = 1.0
        excluded = _exclude_set(exclude, u)
        out: list[int] = []
        seen: set[int] = set()
        for ids in named:
            for item in ids:
                if item in seen or item in excluded:
                    continue
                seen.add(item)
                out.append(item)
        ranked.append(np.asarray(out[:k], dtype=np.int64))
    return ranked, valid


@torch.inference_mode()
def ground_l2(
    gen_embeddings: torch.Tensor,
    item_embeddings: torch.Tensor,
    *,
    k: int,
    exclude: Sequence[np.ndarray] | None = None,
    merge: str = "round_robin",
    batch_size: int = 256,
) -> list[np.ndarray]:
    """BIGRec's L2 grounding: rank all items by distance to each generation's embedding.

    gen_embeddings: [users, d] or [users, beams, d]; item_embeddings: [n_items, d].
    With several beams the per-beam rankings are merged: "round_robin" (beam1 #1, beam2 #1,
    ..., beam1 #2, ...; de-duplicated) or "min" (each item's smallest distance over beams).
    Excluded items never appear. Returns top-k item ids per user (ties by id).
    """
    if merge not in ("round_robin", "min"):
        raise ValueError(f"merge must be 'round_robin' or 'min', got {merge!r}")
    gen = gen_embeddings.float()
    if gen.dim() == 2:
        gen = gen[:, None, :]
    if gen.dim() != 3:
        raise ValueError(f"gen_embeddings must be [users, d] or [users, beams, d], got {tuple(gen.shape)}")
    items = item_embeddings.float().to(gen.device)
    n_items = items.shape[0]
    users, beams, _ = gen.shape
    if exclude is not None and len(exclude) != users:
        raise ValueError(f"exclude has {len(exclude)} entries for {users} users")
    out: list[np.ndarray] = []
    for start in range(0, users, batch_size):
        g = gen[start : start + batch_size]
        b = g.shape[0]
        with torch.autocast(g.device.type, enabled=False):  # distances that rank stay fp32
            dist = torch.cdist(g.reshape(b * beams, -1), items).reshape(b, beams, n_items)
        ex_sets = [_exclude_set(exclude, start + i) for i in range(b)]
        if merge == "min":
            dist = dist.min(dim=1, keepdim=True).values
        # only the nearest k + |excluded| of each beam can be needed
        need = min(n_items, k + max((len(s) for s in ex_sets), default=0))
        if n_items <= 200_000:
            # a stable sort keeps ties (duplicate titles embed identically) in id order
            order = torch.sort(dist, dim=2, stable=True).indices[:, :, :need].cpu().numpy()
        else:
            # large catalogs: partial top-k with a margin, then ties in id order
            vals, idx = torch.topk(dist, min(n_items, need + 64), dim=2, largest=False)
            by_id = torch.sort(idx, dim=2).indices
            vals, idx = vals.gather(2, by_id), idx.gather(2, by_id)
            order = idx.gather(2, torch.sort(vals, dim=2, stable=True).indices)[:, :, :need].cpu().numpy()
        for i in range(b):
            ranked = interleave_round_robin([row.tolist() for row in order[i]], k, ex_sets[i])
            out.append(np.asarray(ranked, dtype=np.int64))
    return out


# -- BM25 grounding (CALRec's quasi-round-robin retrieval) ----------------------------------------


class BM25Index:
    """A BM25 index (the `bm25s` library) over catalog item texts, item id = row.

    Texts are tokenized by bm25s (lower case, words of 2+ characters; `stopwords` None keeps
    every word, "en" drops English stopwords). `topk` breaks score ties by item id.
    """

    def __init__(self, catalog_texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75,
                 stopwords: str | None = None):
        try:
            import bm25s
        except ImportError as exc:  # pragma: no cover - bm25s is a dependency
            raise ImportError("BM25 grounding needs the `bm25s` package: pip install bm25s") from exc
        self._bm25s = bm25s
        self.stopwords = stopwords
        self.n_items = len(catalog_texts)
        if self.n_items == 0:
            raise ValueError("BM25Index needs at least one item text")
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index(self.tokenize(catalog_texts), show_progress=False)

    def tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        return self._bm25s.tokenize([str(t) for t in texts], stopwords=self.stopwords, return_ids=False,
                                    show_progress=False)

    def topk(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(item ids [n, k], scores [n, k]) of each query's k best items, ties by id."""
        k = max(1, min(int(k), self.n_items))
        if not len(queries):
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        docs, scores = self.retriever.retrieve(self.tokenize(queries), k=k, show_progress=False, n_threads=0)
        docs, scores = np.asarray(docs, dtype=np.int64), np.asarray(scores, dtype=np.float32)
        docs, scores = docs.reshape(len(queries), -1), scores.reshape(len(queries), -1)
        order = np.lexsort((docs, -scores), axis=1)  # best score first, ties by id
        return np.take_along_axis(docs, order, 1), np.take_along_axis(scores, order, 1)


def ground_bm25(
    texts: Sequence[Sequence[str]],
    catalog_texts: Sequence[str] | BM25Index,
    *,
    k: int,
    exclude: Sequence[np.ndarray] | None = None,
    per_generation: int | None = None,
    min_score: float = 0.0,
    k1: float = 1.5,
    b: float = 0.75,
    chunk_users: int = 256,
) -> list[np.ndarray]:
    """CALRec's quasi-round-robin BM25 grounding of several generations per user.

    texts[u]: the user's generations, in the order their lists are interleaved (best
    first). Each generation retrieves its BM25 top list over the catalog texts (items
    scoring <= min_score, i.e. sharing no word, are dropped); the lists are merged
    round-robin (gen0 #1, gen1 #1, ..., gen0 #2, ...) skipping repeats and excluded ids.
    per_generation: length of each list (default k + the user's number of exclusions, so
    exclusions never shorten a list below k). `catalog_texts` may be a prebuilt BM25Index.
    Returns up to k item ids per user (shorter when the generations match too few items).
    """
    index = catalog_texts if isinstance(catalog_texts, BM25Index) else BM25Index(catalog_texts, k1=k1, b=b)
    if exclude is not None and len(exclude) != len(texts):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(texts)} users")
    out: list[np.ndarray] = []
    ex_all = [_exclude_set(exclude, u) for u in range(len(texts))]
    start = 0
    while start < len(texts):
        # a chunk of users whose (queries x list depth) result arrays stay below ~2e7 entries
        end, depth, n_queries = start, 1, 0
        while end < len(texts) and end - start < chunk_users:
            d = per_generation or (k + len(ex_all[end]))
            if end > start and (n_queries + len(texts[end])) * max(depth, d) > 20_000_000:
                break
            depth, n_queries = max(depth, d), n_queries + len(texts[end])
            end += 1
        rows = range(start, end)
        start = end
        ex_sets = {u: ex_all[u] for u in rows}
        queries = [str(t) for u in rows for t in texts[u]]
        docs, scores = index.topk(queries, depth)
        pos = 0
        for u in rows:
            lists = []
            for _ in texts[u]:
                keep = scores[pos] > min_score
                lists.append(docs[pos][keep].tolist())
                pos += 1
            out.append(np.asarray(interleave_round_robin(lists, k, ex_sets[u]), dtype=np.int64))
    return out


__all__ += ["BM25Index", "ground_bm25"]
