"""Grounding generated text / embeddings to catalog ids."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmark.grounding import (
    ground_exact,
    ground_l2,
    interleave_round_robin,
    normalize_text,
    title_index,
)
from benchmark.llm.decoding import embed_token_ids

CATALOG = ["Toy Story (1995)", "Heat (1995)", "Sabrina (1995)", "Heat (1995)", "Casino (1995)"]


def test_title_index_keeps_every_duplicate_in_id_order():
    index = title_index(CATALOG)
    assert index["heat (1995)"] == [1, 3]
    assert index["toy story (1995)"] == [0]
    assert len(index) == 4
    assert normalize_text('  "Toy   Story (1995)" ') == "toy story (1995)"


def test_ground_exact_duplicates_exclusion_and_validity():
    texts = [
        ["heat (1995)", "Casino (1995)"],  # duplicate title -> both ids, then the next beam
        ["Not A Movie", "toy story (1995)"],  # top beam invalid, second beam grounds
        ["Heat (1995)", "Sabrina (1995)", "Casino (1995)"],  # id 1 seen: 3 stays
    ]
    exclude = [np.array([], dtype=np.int64), np.array([], dtype=np.int64), np.array([1])]
    ranked, valid = ground_exact(texts, CATALOG, k=3, exclude=exclude)
    assert ranked[0].tolist() == [1, 3, 4]
    assert ranked[1].tolist() == [0]
    assert ranked[2].tolist() == [3, 2, 4]
    assert valid.tolist() == [1.0, 0.0, 1.0]
    ranked_k1, _ = ground_exact(texts, title_index(CATALOG), k=1, exclude=None)
    assert [r.tolist() for r in ranked_k1] == [[1], [0], [1]]


def test_interleave_round_robin_order_and_dedup():
    lists = [[5, 1, 2, 9], [1, 3, 2], [7]]
    assert interleave_round_robin(lists, k=10) == [5, 1, 7, 3, 2, 9]
    assert interleave_round_robin(lists, k=3) == [5, 1, 7]
    assert interleave_round_robin(lists, k=10, exclude={1, 7}) == [5, 3, 2, 9]
    assert interleave_round_robin([], k=3) == []


def test_ground_l2_single_and_round_robin_beams():
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 1.0]])
    # one embedding per user
    got = ground_l2(torch.tensor([[0.1, 0.0], [1.9, 0.0]]), items, k=3,
                    exclude=[np.array([], dtype=np.int64), np.array([2])])
    assert got[0].tolist() == [0, 1, 3]  # d = 0.1, 0.9, 1.005 (3 and 5 tie: id order)
    assert got[1].tolist() == [1, 0, 3]
    # two beams: beam0 near item 1 (then 2, 0), beam1 near items 3/5 (identical, id order)
    gen = torch.tensor([[[1.1, 0.0], [0.0, 1.05]]])
    rr = ground_l2(gen, items, k=5, exclude=None)
    assert rr[0].tolist() == [1, 3, 2, 5, 0]
    rr_ex = ground_l2(gen, items, k=3, exclude=[np.array([3])])
    assert rr_ex[0].tolist() == [1, 2, 5]
    mn = ground_l2(gen, items, k=3, exclude=None, merge="min")
    assert mn[0].tolist() == [3, 5, 1]


def test_ground_l2_ranks_a_verbatim_generation_first():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    item_ids = [list(map(int, rng.integers(2, 64, size=rng.integers(2, 7)))) for _ in range(25)]
    item_emb = embed_token_ids(model, item_ids, pad_id=0, batch_size=8, progress=False)
    generated = [item_ids[17], item_ids[4]]
    gen_emb = embed_token_ids(model, generated, pad_id=0, batch_size=2, progress=False)
    got = ground_l2(gen_emb, item_emb, k=5, exclude=None)
    assert got[0][0] == 17 and got[1][0] == 4
    assert torch.cdist(gen_emb[:1], item_emb[17:18]).item() < 1e-4
    assert all(len(set(g.tolist())) == 5 for g in got)
    # seen items never come back, even the verbatim one
    got_ex = ground_l2(gen_emb, item_emb, k=5, exclude=[np.array([17]), np.array([])])
    assert 17 not in got_ex[0].tolist() and got_ex[1][0] == 4
