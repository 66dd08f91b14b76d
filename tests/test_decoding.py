"""Trie-constrained beam search, free generation and pooled embeddings on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmark.llm.decoding import (
    ItemTrie,
    constrained_beam_search,
    embed_token_ids,
    generate_free,
    reference_constrained_beam_search,
)

EOS, PAD = 1, 0


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def synthetic_items(seed: int, n: int = 30, lengths=(1, 5)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    items = [list(map(int, rng.integers(2, 12, size=rng.integers(*lengths)))) for _ in range(n)]
    # make sure two items share a text (like ML-100K's duplicate titles) and that one
    # item's text is a prefix of another's
    items[7] = list(items[3])
    items[9] = items[4] + [5, 6]
    return items


def prompts_of(seed: int, lengths=(5, 9, 3)) -> list[list[int]]:
    rng = np.random.default_rng(seed + 100)
    return [list(map(int, rng.integers(2, 64, size=n))) for n in lengths]


def exact_scores(model, prompt: list[int], items: list[list[int]]) -> np.ndarray:
    """log p(item + eos | prompt) by teacher forcing, for every item."""
    out = []
    with torch.no_grad():
        for it in items:
            seq = prompt + it + [EOS]
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
            pos = torch.arange(len(prompt) - 1, len(seq) - 1)
            out.append(float(logp[pos, torch.tensor(seq[len(prompt):])].sum()))
    return np.array(out)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = tiny_model(0)
    items = synthetic_items(0)
    trie = ItemTrie.build(items, EOS)
    return model, items, trie


def test_trie_layout_and_duplicates(setup):
    _, items, trie = setup
    first = trie.first_child.numpy()
    count = trie.n_children.numpy()
    token = trie.token.numpy()
    # children are contiguous, after their parent, with distinct tokens
    for node in range(trie.n_nodes):
        kids = range(first[node], first[node] + count[node])
        assert all(trie.parent[c] == node and c > node for c in kids)
        assert len({token[c] for c in kids}) == count[node]
    assert int(trie.n_under[0]) == len(items)
    # the duplicate text ends on one leaf that holds both ids, in id order
    assert trie.item_leaf[3] == trie.item_leaf[7]
    assert trie.items_at(int(trie.item_leaf[3])).tolist() == [3, 7]
    # prefix item: after items[4] both eos and the continuation of items[9] are allowed
    assert set(trie.allowed_tokens(items[4])) == {EOS, 5}
    assert trie.allowed_tokens(items[0] + [EOS]) == []


def test_model_attention_setting_is_restored(setup):
    model, _, trie = setup
    before = model.config._attn_implementation
    constrained_beam_search(model, prompts_of(9), trie, num_beams=2, k=2, exclude=None,
                            pad_id=PAD, progress=False)
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_exact_when_beams_cover_catalog(setup, shared_prompt):
    model, items, trie = setup
    prompts = prompts_of(0)
    res = constrained_beam_search(model, prompts, trie, num_beams=len(items), k=len(items),
                                  exclude=None, pad_id=PAD, progress=False,
                                  shared_prompt=shared_prompt)
    for prompt, got in zip(prompts, res):
        scores = exact_scores(model, prompt, items)
        want = sorted(range(len(items)), key=lambda i: (-scores[i], i))
        assert [i for i, _ in got] == want
        np.testing.assert_allclose([s for _, s in got], scores[want], atol=1e-4)


def test_results_are_catalog_items_distinct_and_never_excluded(setup):
    model, items, trie = setup
    prompts = prompts_of(1)
    exclude = [np.array([3, 5, 11]), np.array([], dtype=np.int64), np.array([0, 1, 2, 9])]
    res = constrained_beam_search(model, prompts, trie, num_beams=6, k=6, exclude=exclude,
                                  pad_id=PAD, progress=False)
    for got, ex in zip(res, exclude):
        ids = [i for i, _ in got]
        assert len(ids) == 6 and len(set(ids)) == 6
        assert all(0 <= i < len(items) for i in ids)
        assert not set(ids) & set(ex.tolist())
        scores = [s for _, s in got]
        assert scores == sorted(scores, reverse=True)


def test_exclusion_prunes_inside_the_search(setup):
    # with one beam, a search that did not prune excluded paths would walk into them
    model, items, trie = setup
    prompts = prompts_of(2)
    keep = 13
    exclude = [np.array([i for i in range(len(items)) if i != keep])] * len(prompts)
    res = constrained_beam_search(model, prompts, trie, num_beams=1, k=5, exclude=exclude,
                                  pad_id=PAD, progress=False)
    for prompt, got in zip(prompts, res):
        assert [i for i, _ in got] == [keep]
        assert got[0][1] == pytest.approx(exact_scores(model, prompt, [items[keep]])[0], abs=1e-4)


def test_excluding_one_duplicate_keeps_the_other(setup):
    model, items, trie = setup
    prompts = prompts_of(3)
    full = constrained_beam_search(model, prompts, trie, num_beams=len(items), k=len(items),
                                   exclude=None, pad_id=PAD, progress=False)
    for got in full:  # duplicates: adjacent, same score, id order
        ids = [i for i, _ in got]
        p3, p7 = ids.index(3), ids.index(7)
        assert p7 == p3 + 1 and got[p3][1] == got[p7][1]
    part = constrained_beam_search(model, prompts, trie, num_beams=len(items), k=len(items),
                                   exclude=[np.array([3])] * 3, pad_id=PAD, progress=False)
    for got in part:
        ids = [i for i, _ in got]
        assert 7 in ids and 3 not in ids and len(ids) == len(items) - 1


def test_batched_left_padding_equals_one_at_a_time(setup):
    model, items, trie = setup
    prompts = prompts_of(4, lengths=(11, 2, 6, 4))
    exclude = [np.array([1]), np.array([2, 3]), np.array([], dtype=np.int64), np.array([0])]
    kw = dict(num_beams=4, k=5, exclude=exclude, pad_id=PAD, progress=False)
    batched = constrained_beam_search(model, prompts, trie, batch_size=4, **kw)
    single = constrained_beam_search(model, prompts, trie, batch_size=1, **kw)
    replicated = constrained_beam_search(model, prompts, trie, batch_size=3, shared_prompt=False, **kw)
    for b, r in zip(batched, replicated):
        assert [i for i, _ in b] == [i for i, _ in r]
        np.testing.assert_allclose([x for _, x in b], [x for _, x in r], atol=1e-4)
    for b, s in zip(batched, single):
        assert [i for i, _ in b] == [i for i, _ in s]
        np.testing.assert_allclose([x for _, x in b], [x for _, x in s], atol=1e-4)


def test_agrees_with_transformers_generate_reference():
    """Naive baseline: generate(prefix_allowed_tokens_fn=dict trie), same beams."""
    model = tiny_model(3)
    rng = np.random.default_rng(3)
    items = [list(map(int, rng.integers(2, 12, size=3))) for _ in range(40)]
    trie = ItemTrie.build(items, EOS)
    prompts = prompts_of(5, lengths=(5, 9, 3, 7))
    nb = 4
    ours = constrained_beam_search(model, prompts, trie, num_beams=nb, k=nb * 2, exclude=None,
                                   pad_id=PAD, progress=False)
    ref = reference_constrained_beam_search(model, prompts, items, num_beams=nb, num_return=nb,
                                            eos_id=EOS, pad_id=PAD, batch_size=1)
    for o, r in zip(ours, ref):
        # compare texts (the reference returns one sequence per duplicate text)
        texts, scores = [], []
        for i, s in o:
            if tuple(items[i]) not in texts:
                texts.append(tuple(items[i]))
                scores.append(s)
        assert texts[:nb] == [tuple(s) for s, _ in r]
        np.testing.assert_allclose(scores[:nb], [s for _, s in r], atol=1e-4)


def test_restrict_to_a_candidate_subset(setup):
    model, items, trie = setup
    allowed = [2, 5, 7, 11, 20]
    sub = trie.restrict(allowed)
    res = constrained_beam_search(model, prompts_of(6), sub, num_beams=5, k=10,
                                  exclude=[np.array([5])] * 3, pad_id=PAD, progress=False)
    for got in res:
        assert sorted(i for i, _ in got) == [2, 7, 11, 20]


def test_length_penalty_ranks_by_mean_log_prob(setup):
    model, items, trie = setup
    prompt = prompts_of(7)[:1]
    got = constrained_beam_search(model, prompt, trie, num_beams=len(items), k=5, exclude=None,
                                  pad_id=PAD, progress=False, length_penalty=1.0)[0]
    scores = exact_scores(model, prompt[0], items)
    norm = scores / np.array([len(it) + 1 for it in items])
    want = sorted(range(len(items)), key=lambda i: (-norm[i], i))[:5]
    assert [i for i, _ in got] == want
    np.testing.assert_allclose([s for _, s in got], scores[want], atol=1e-4)  # raw log-probs


@pytest.mark.parametrize("num_beams,length_penalty,shared", [(1, 1.0, True), (3, 0.0, True),
                                                              (3, 1.0, True), (3, 1.0, False)])
def test_generate_free_matches_transformers_beam_search(setup, num_beams, length_penalty, shared):
    model = setup[0]
    prompts = prompts_of(8)
    got = generate_free(model, prompts, max_new_tokens=6, num_beams=num_beams, pad_id=PAD,
                        eos_id=EOS, batch_size=3, progress=False, length_penalty=length_penalty,
                        shared_prompt=shared)
    for prompt, beams in zip(prompts, got):
        out = model.generate(torch.tensor([prompt]), num_beams=num_beams,
                             num_return_sequences=num_beams, max_new_tokens=6, do_sample=False,
                             length_penalty=length_penalty, eos_token_id=EOS, pad_token_id=EOS)
        want = []
        for row in out[:, len(prompt):].tolist():  # finished rows are padded with eos
            want.append(row[: row.index(EOS)] if EOS in row else row)
        assert beams == want


def test_embed_token_ids_excludes_padding(setup):
    model, items, _ = setup
    seqs = [items[0] + [20, 21], items[1], [30, 31, 32, 33, 34, 35]]
    for pooling in ("last", "mean"):
        batched = embed_token_ids(model, seqs, pooling=pooling, pad_id=PAD, batch_size=3,
                                  progress=False)
        assert batched.shape == (3, 32) and batched.dtype == torch.float32
        for i, s in enumerate(seqs):
            with torch.no_grad():
                h = model(torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0]
            want = h[-1] if pooling == "last" else h.mean(0)
            torch.testing.assert_close(batched[i], want, atol=1e-4, rtol=1e-4)
